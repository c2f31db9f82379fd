"""`fastdit demo`: a class-conditional DiT trained and judged on scikit-learn's 8x8 digits, on a CPU."""

from __future__ import annotations

import argparse
import shlex

from ..diffusion.flow import TIME_SAMPLINGS
from ..objectives import objective_names
from ..sampling import OPTIONS
from ..program import program_words
from .arg_types import finite_float, seed

HELP = ("train a tiny DiT on the 8x8 digits (no download, minutes on a CPU; in pixels or in an RAE latent space), "
        "sample every class, and judge the samples")


def recipe_defaults(name: str) -> str:
    """"flow 400, x-pred 500, ..." for one field of every objective's demo recipe."""
    from ..demo.run import RECIPES

    def shown(value):
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    return ", ".join(f"{objective} {shown(getattr(recipe, name))}" for objective, recipe in RECIPES.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo.rae import DECODER
    from ..demo.run import LATENTS, DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help=f"output folder; running again with the same folder reuses its training (more --steps continue it) (default: {d.out})")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=None,
                       help="training steps (default: the objective's recipe's: " + recipe_defaults("steps") + ")")
    group.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default: {d.batch_size})")
    group.add_argument("--lr", type=finite_float, default=d.lr, help=f"AdamW learning rate (default: {d.lr})")
    group.add_argument("--ema-decay", type=finite_float, default=d.ema_decay, help=f"EMA decay per step; the samples come from the EMA (default: {d.ema_decay})")
    group.add_argument("--latent", choices=LATENTS, default=d.latent,
                       help="where the DiT diffuses: pixels, or rae: the latent space of the digit encoder's tokens "
                            "(RAE, Zheng et al. 2025): `train-decoder` trains its ViT decoder first (about a minute), "
                            "then DiT^DH-T trains with RAE's objective (default: pixels)")
    group.add_argument("--decoder-epochs", type=finite_float, default=None,
                       help=f"--latent rae: epochs of the decoder's training (default: {DECODER.epochs:g})")
    group.add_argument("--objective", choices=objective_names(), default=None,
                       help="ddpm (DiT's process), flow (SiT's), x-pred (JiT's), meanflow (one-step, Geng et al. "
                            "2025) or rae (RAE's, for --latent rae) (default: flow; rae with --latent rae)")
    group.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default=None,
                       help="flow and x-pred: how training draws t (default: logit-normal; x-pred with JiT's mean -0.8 "
                            "and std 0.8)")
    group.add_argument("--repa", action=argparse.BooleanOptionalAction, default=None,
                       help="representation alignment (REPA) with a frozen digit encoder the demo trains in seconds "
                            "(default: the objective's recipe's: " + recipe_defaults("repa") + ")")
    group.add_argument("--blocks", action=argparse.BooleanOptionalAction, default=None,
                       help="LightningDiT blocks: RMSNorm, SwiGLU, 2-D RoPE, QK-norm (default: the objective's recipe's: "
                            + recipe_defaults("blocks") + ")")
    group.add_argument("--posthoc-ema", action=argparse.BooleanOptionalAction, default=d.posthoc_ema,
                       help="also store post-hoc EMA snapshots (EDM2), so that `fastdit sweep` can try any EMA length "
                            "beside the guidance scale (default: off)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--samples-per-class", type=int, default=d.samples_per_class, help=f"images sampled of each digit, then judged (at least 2; default: {d.samples_per_class})")
    # Three sampling options under the demo's own flag names (--sampling-steps): their help from the schema.
    sampler, steps, cfg = OPTIONS["sampler"], OPTIONS["num_steps"], OPTIONS["cfg_scale"]
    group.add_argument("--sampler", choices=sampler.choices(), default=d.sampler,
                       help=f"{sampler.help} (default: heun for flow and x-pred, ddpm for ddpm, meanflow for meanflow)")
    group.add_argument("--sampling-steps", type=int, default=d.sampling_steps,
                       help=f"{steps.help} (default: 9 for flow and x-pred, 25 for ddpm, 1 for meanflow)")
    group.add_argument("--cfg-scale", type=finite_float, default=d.cfg_scale,
                       help=f"{cfg.help}, up to {cfg.bounds[1]:g}; meanflow trains it in (its omega) and samples with "
                            f"one call (default: {d.cfg_scale})")
    # A sampling option's error names these flags (`OptionError`); the demo sets no other option.
    parser.set_defaults(_option_flags={"sampler": sampler.flag, "num_steps": "--sampling-steps", "cfg_scale": cfg.flag})
    parser.add_argument("--classifier-epochs", type=int, default=d.classifier_epochs,
                        help=f"epochs of the digit classifier that judges the samples (default: {d.classifier_epochs})")
    parser.add_argument("--seed", type=seed, default=d.seed, help=f"seed of the data split, training, sampling and the classifier (default: {d.seed})")
    parser.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="progress bars (default: on)")


def run(args: argparse.Namespace) -> int:
    from ..demo.report import format_report
    from ..demo.run import DemoConfig, run_demo

    config = DemoConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        samples_per_class=args.samples_per_class, sampler=args.sampler, sampling_steps=args.sampling_steps,
        cfg_scale=args.cfg_scale, objective=args.objective, time_sampling=args.time_sampling, blocks=args.blocks,
        repa=args.repa, posthoc_ema=args.posthoc_ema, latent=args.latent, decoder_epochs=args.decoder_epochs,
        classifier_epochs=args.classifier_epochs, seed=args.seed, device=args.device, progress=args.progress,
    )
    result = run_demo(config)
    print(format_report(result.report))
    if "latent" in result.report:
        from ..demo.rae import format_latent_lines

        print("\n".join(format_latent_lines(result.report["latent"], result.report["latent"]["pixel_reference"])))
    seconds = result.report["seconds"]
    print(f"took {seconds['total']:.0f} s (training {seconds['train']:.0f} s, sampling {seconds['sampling']:.0f} s, "
          f"evaluation {seconds['evaluation']:.0f} s)")
    print(f"files in {result.out_dir}:")
    for name, path in result.files.items():
        print(f"  {name:<10} {path}")
    sampling = result.report["sampling"]
    command = [*program_words(), "sample", "--ckpt", str(result.files["checkpoint"]), "--sampler", sampling["sampler"],
               "--num-sampling-steps", str(sampling["num_steps"]), "--cfg-scale", str(sampling["cfg_scale"]),
               "--class-labels", *map(str, range(10)), "--nrow", "10", "--out", "digits.png"]
    print(f"sample more with: {shlex.join(command)}")
    if config.posthoc_ema:  # the snapshots are there: the guidance scale and the EMA length can be chosen now
        from ..demo.run import TRAIN_RUN

        sweep = [*program_words(), "sweep", "--run-dir", str(result.out_dir / TRAIN_RUN), "--metric", "digits",
                 "--ema", "last", "0.05", "0.1", "0.15", "0.2", "--cfg-scale", "1.25", "1.5", "2", "3", "4",
                 "--num-samples", "200", "--confirm", "3", "--confirm-samples", "1000", "--label-sampling", "equal",
                 "--out", str(result.out_dir / "sweep")]
        print(f"choose the guidance scale and EMA length with: {shlex.join(sweep)}")
    return 0
