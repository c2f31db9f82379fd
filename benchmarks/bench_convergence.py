"""How fast each training recipe gets the digits demo to good samples, on one machine in one run.

    python benchmarks/bench_convergence.py                       # every recipe, steps 250..1000
    python benchmarks/bench_convergence.py --recipes dit flow-blocks --steps 400 800
    python benchmarks/bench_convergence.py --posthoc --recipes flow-blocks --steps 1000   # EMA length table

Every recipe trains the demo's model (DiT-T/2 on the 1,438 training digits, batch 128, lr 1e-3, EMA
0.99, seed 0) in segments up to each step count (resuming is the same command, so the segments add up
to one run), and after each segment samples 50 images per digit with guidance (cfg 3) from the EMA.
One judge (the demo's CNN, trained on the 359 held-out digits) scores every sample set: the share
classified as the digit it was conditioned on, and the Frechet distance of its features to real
digits (with the real-vs-real floor for the same sample sizes). Then the number of model calls at
sampling: the final checkpoints with DDPM-25 (DiT) and ODE Euler/Heun at 8, 16 and 32 calls (flow).

With --posthoc, one recipe trains once to the largest step count with `--posthoc-ema` (EDM2's two
power-function EMAs, snapshots every --posthoc-every steps), and the same judge scores the EMA of each
length in --sigma-rels, reconstructed from the snapshots as `fastdit ema` makes it, beside the run's
own EMA (decay 0.99): which EMA length serves the demo best.

A recipe with `latent: rae` (rae-latent) diffuses in the RAE latent space of the demo's digit encoder
(`fastdit demo --latent rae`): its decoder is trained first and its seconds are part of the training time.

Wall seconds count on an otherwise idle machine only: run nothing else meanwhile (`nice` does not help
on 2 cores). The table names the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastdit import devices  # noqa: E402
from fastdit.checkpoint import load_model  # noqa: E402
from fastdit.data import load_digits_tensors, split_digits  # noqa: E402
from fastdit.data.digits import DIGITS_HELDOUT_FRACTION  # noqa: E402
from fastdit.demo.classifier import ClassifierOptions, uint8_to_model_input  # noqa: E402
from fastdit.demo.encoder import digit_encoder_file  # noqa: E402
from fastdit.demo.run import NUM_CLASSES, DemoConfig, Judge, train_config  # noqa: E402
from fastdit.latents import PixelSpace, load_latent_space  # noqa: E402
from fastdit.sampling import SamplingOptions, generate, to_uint8  # noqa: E402
from fastdit.train.config import flat_fields  # noqa: E402
from fastdit.train.loop import train  # noqa: E402

# name -> (objective, time sampling, LightningDiT blocks, sampler, sampling steps, other objective
# settings). DiT samples as the demo did (DDPM-25); the flow-path recipes (flow, x-pred) with ODE Heun at
# 16 model calls (num_steps counts grid points). "x-pred-blocks" differs from "flow-blocks" only in what
# the network predicts; "x-pred-jit" uses JiT's time sampling (logit-normal, mean -0.8, std 0.8).
RECIPES = {
    "dit": ("ddpm", "uniform", False, "ddpm", 25, {}),
    "flow": ("flow", "uniform", False, "heun", 9, {}),
    "flow-logitnormal": ("flow", "logit-normal", False, "heun", 9, {}),
    "flow-blocks": ("flow", "logit-normal", True, "heun", 9, {}),
    "x-pred-blocks": ("x-pred", "logit-normal", True, "heun", 9, {}),
    "x-pred-jit": ("x-pred", "logit-normal", True, "heun", 9, {"logit_normal_mean": -0.8, "logit_normal_std": 0.8}),
    # REPA on the demo's recipe: the digits' frozen encoder (fastdit.demo.encoder), aligned at block K of
    # 6 with weight λ (REPA aligns about a third of the way in: 8 of 28 blocks for XL, 4 of 12 for B).
    # The projector's width is the demo's (256, DemoConfig): REPA's 2048 is sized for XL's width 1152 and
    # would cost more than this DiT (measured: 3x the step time).
    "flow-blocks-repa-k2": ("flow", "logit-normal", True, "heun", 9, {"repa_depth": 2, "repa_weight": 0.5}),
    "flow-blocks-repa-k2-w1": ("flow", "logit-normal", True, "heun", 9, {"repa_depth": 2, "repa_weight": 1.0}),
    "flow-blocks-repa-k3": ("flow", "logit-normal", True, "heun", 9, {"repa_depth": 3, "repa_weight": 0.5}),
    # MeanFlow with the blocks, guidance trained in (ω = the run's cfg scale), sampled with one model call;
    # its own time sampling (the paper's defaults), so the time sampling named here is not used.
    "meanflow-blocks": ("meanflow", "logit-normal", True, "meanflow", 1, {}),
    # Improved MeanFlow's options one at a time: the v-loss (the derivative along the network's own
    # velocity); the guidance scale as an input (trained over [1, 4], sampled at the run's cfg scale).
    "meanflow-blocks-v-loss": ("meanflow", "logit-normal", True, "meanflow", 1, {"meanflow_v_loss": True}),
    "meanflow-blocks-guidance-input": ("meanflow", "logit-normal", True, "meanflow", 1,
                                       {"meanflow_guidance_input": True, "meanflow_omega": 1.0}),
    # Token routing (TREAD) on the demo's 6 blocks and 16 tokens: the paper's rate and span (half the tokens
    # skip blocks[2:-1], i.e. blocks 2-4); a lighter rate; a wider span (blocks 1-4); and DiT's recipe routed.
    # The paper's gains are measured at 256 tokens and 28 blocks: whether 16 tokens leave enough to route
    # is what these rows answer (the same judge, wall seconds to 98% class match).
    "flow-blocks-route": ("flow", "logit-normal", True, "heun", 9, {"route": 0.5, "route_blocks": "2:-1"}),
    "flow-blocks-route-0.25": ("flow", "logit-normal", True, "heun", 9, {"route": 0.25, "route_blocks": "2:-1"}),
    "flow-blocks-route-wide": ("flow", "logit-normal", True, "heun", 9, {"route": 0.5, "route_blocks": "1:-1"}),
    "dit-route": ("ddpm", "uniform", False, "ddpm", 25, {"route": 0.5, "route_blocks": "2:-1"}),
    # The demo's recipe (REPA at block 2, outside the span) routed at the paper's rate and at a lighter one.
    "demo-route": ("flow", "logit-normal", True, "heun", 9,
                   {"repa_depth": 2, "repa_weight": 1.0, "route": 0.5, "route_blocks": "2:-1"}),
    "demo-route-0.25": ("flow", "logit-normal", True, "heun", 9,
                        {"repa_depth": 2, "repa_weight": 1.0, "route": 0.25, "route_blocks": "2:-1"}),
    # The dispersive loss (Wang & He 2025) on the last block, in groups of 32 of the batch of 128: the released
    # code's weight 0.25 and a heavier 0.5 on the demo's recipe, and 0.25 on the recipe without REPA (the
    # paper's claim: a regulariser that needs no encoder).
    "demo-disperse": ("flow", "logit-normal", True, "heun", 9, {"repa_depth": 2, "repa_weight": 1.0, "disperse": 0.25}),
    "demo-disperse-0.5": ("flow", "logit-normal", True, "heun", 9,
                          {"repa_depth": 2, "repa_weight": 1.0, "disperse": 0.5}),
    "flow-blocks-disperse": ("flow", "logit-normal", True, "heun", 9, {"disperse": 0.25}),
    # RAE (Zheng et al. 2025) on the digits, `fastdit demo --latent rae`: the digit encoder's 64 x 4 x 4 tokens
    # as latents, a ViT decoder trained on them by `train-decoder` first (its wall time counted in the row's
    # training seconds: RAE's cost is both stages; the encoder, as for REPA, is trained before any timing),
    # then DiT^DH-T with RAE's objective, its times shifted by sqrt(1024 / 64). Set beside the demo's pixel
    # recipe (flow-blocks-repa-k2-w1) at equal wall time.
    "rae-latent": ("rae", "logit-normal", False, "euler", 20, {"latent": "rae", "time_shift_base": 64}),
}
MEANFLOW_CALLS = (1, 2, 4)  # the NFE rows of a MeanFlow model: one model call a step
# NFE rows: sampler -> grid points for a number of model calls (Euler: one call per step; Heun: two).
NFE_GRIDS = {"euler": lambda calls: calls + 1, "heun": lambda calls: calls // 2 + 1}


def set_setting(run, key: str, value) -> None:
    """Set one `fastdit train` setting (its flat name) on a config, in whichever section holds it."""
    section, field = flat_fields()[key]
    setattr(getattr(run, section), field.name, value)


@dataclass
class Row:
    recipe: str
    steps: int
    train_seconds: float
    sampler: str
    model_calls: int
    sample_seconds: float
    class_match: float
    fd: float
    fd_floor: float


def model_calls(sampler: str, num_steps: int) -> int:
    return {"ddpm": num_steps, "ddim": num_steps, "dpm++2m": num_steps, "meanflow": num_steps, "euler": num_steps - 1,
            "heun": 2 * (num_steps - 1), "sde-euler": num_steps, "sde-heun": 2 * (num_steps - 1) + 1}[sampler]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--steps", nargs="+", type=int, default=[250, 500, 750, 1000])
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--nfe", nargs="*", type=int, default=[8, 16, 32], help="model calls for the NFE rows")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--posthoc", action="store_true",
                        help="the EMA-length table: train the (one) recipe with --posthoc-ema and judge reconstructed EMAs")
    parser.add_argument("--sigma-rels", nargs="+", type=float, default=[0.02, 0.05, 0.075, 0.10, 0.15, 0.20, 0.25],
                        help="EMA lengths σ_rel judged with --posthoc")
    parser.add_argument("--posthoc-every", type=int, default=25, help="steps between snapshots with --posthoc")
    return parser.parse_args(argv)


def cpu_name() -> str:
    return (f"{devices.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
            f"(ATen {torch.backends.cpu.get_cpu_capability()})")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="fastdit-convergence-"))
    images, real_labels = load_digits_tensors()
    real = uint8_to_model_input(to_uint8(images))
    dit_train, heldout = split_digits(real_labels, DIGITS_HELDOUT_FRACTION, 0)
    judge = Judge(real, real_labels.numpy(), judge_train=heldout.numpy(), judge_test=dit_train.numpy(), seed=0,
                  classifier_options=ClassifierOptions(seed=0))
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), args.samples_per_class)

    def score(recipe, steps, train_seconds, model, info, sampler, num_steps) -> Row:
        # A model with guidance trained in (MeanFlow: ω = --cfg-scale at training) samples without more;
        # one that takes the scale as an input is fed --cfg-scale.
        cfg_scale = info.objective.sampling.cfg_scale(args.cfg_scale, conditional=True)
        options = SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale)
        start = time.perf_counter()
        space = PixelSpace(1) if info.latent.kind == "pixels" else load_latent_space(info.latent.vae)
        samples = generate(model, space, labels, options=options, objective=info.objective, seed=0)
        seconds = time.perf_counter() - start
        report = judge.report(samples, labels)
        fd = report["frechet_distance"]
        row = Row(recipe, steps, train_seconds, sampler, model_calls(sampler, num_steps), seconds,
                  report["class_match"], fd["samples_vs_real"], fd["real_vs_real"])
        print(f"  {row}", flush=True)
        return row

    if args.posthoc:
        return posthoc_table(args, work, score)

    rows, nfe_rows = [], []
    for name in args.recipes:
        objective, time_sampling, blocks, sampler, num_steps, settings = RECIPES[name]
        alignment = {key: value for key, value in settings.items() if key.startswith("repa")}
        latent = settings.get("latent", "pixels")
        # The recipe's own settings only (objective_settings={}: not the demo's per-objective defaults).
        config = DemoConfig(out=str(work / name), objective=objective, time_sampling=time_sampling, blocks=blocks,
                            progress=False, repa=bool(alignment), objective_settings={}, latent=latent, **alignment)
        if config.repa or latent == "rae":  # the digits' encoder, trained once (a few seconds) before any timing
            digit_encoder_file(config.out, config.seed)
        elapsed = 0.0
        if latent == "rae":  # its decoder: part of the recipe's training time
            from fastdit.demo.rae import train_digit_decoder

            start = time.perf_counter()
            train_digit_decoder(config)
            elapsed = time.perf_counter() - start
        for steps in sorted(args.steps):
            start = time.perf_counter()
            run = train_config(replace(config, steps=steps))
            run.run.log_every = max(steps, 1)
            for key, value in settings.items():
                if not key.startswith("repa") and key != "latent":  # REPA's and the latent are the DemoConfig's
                    set_setting(run, key, value)
            result = train(run)
            elapsed += time.perf_counter() - start
            model, info = load_model(result.export)
            rows.append(score(name, steps, elapsed, model, info, sampler, num_steps))
        if objective == "meanflow":
            for calls in MEANFLOW_CALLS:
                nfe_rows.append(score(name, steps, elapsed, model, info, "meanflow", calls))
        elif objective != "ddpm":
            for calls in args.nfe:
                for nfe_sampler, points in NFE_GRIDS.items():
                    nfe_rows.append(score(name, steps, elapsed, model, info, nfe_sampler, points(calls)))
        else:
            nfe_rows.append(rows[-1])

    print(f"\nConvergence on the digits demo ({cpu_name()}); {len(labels)} samples, cfg {args.cfg_scale}")
    print("\nfirst measured step count at >= 98% class match")
    for name in args.recipes:
        reached = [r for r in rows if r.recipe == name and r.class_match >= 0.98]
        print(f"  {name}: " + (f"{reached[0].steps} steps, {reached[0].train_seconds:.0f} s of training, Frechet "
                                f"{reached[0].fd:.1f}" if reached else "not reached"))
    header = "| recipe | steps | train s | sampler | model calls | sample s | class match | Frechet (real floor) |"
    rule = "|---|---|---|---|---|---|---|---|"
    for title, table in (("training", rows), ("sampling cost (final checkpoints)", nfe_rows)):
        print(f"\n{title}\n{header}\n{rule}")
        for r in table:
            print(f"| {r.recipe} | {r.steps} | {r.train_seconds:.0f} | {r.sampler} | {r.model_calls} | "
                  f"{r.sample_seconds:.1f} | {r.class_match:.1%} | {r.fd:.1f} ({r.fd_floor:.1f}) |")
    return 0


def recipe_config(name: str, work: Path, steps: int):
    """The recipe's `fastdit train` config at `steps` (and its sampler), as the convergence rows train it."""
    objective, time_sampling, blocks, sampler, num_steps, settings = RECIPES[name]
    alignment = {key: value for key, value in settings.items() if key.startswith("repa")}
    config = DemoConfig(out=str(work / name), objective=objective, time_sampling=time_sampling, blocks=blocks,
                        progress=False, repa=bool(alignment), steps=steps, objective_settings={}, **alignment)
    if config.repa:
        digit_encoder_file(config.out, config.seed)
    run = train_config(config)
    for key, value in settings.items():
        if not key.startswith("repa"):
            set_setting(run, key, value)
    return run, sampler, num_steps


def posthoc_table(args, work: Path, score) -> int:
    """Judge figures against the EMA length σ_rel for one finished run, from reconstructed exports."""
    from fastdit.checkpoint import export_weights
    from fastdit.model_info import ModelInfo
    from fastdit.train.posthoc_reconstruct import default_output, reconstruct_ema

    if len(args.recipes) != 1:
        raise SystemExit("--posthoc judges one run: pass one recipe with --recipes")
    name, steps = args.recipes[0], max(args.steps)
    run, sampler, num_steps = recipe_config(name, work, steps)
    run.posthoc.posthoc_ema, run.posthoc.posthoc_every = True, args.posthoc_every
    run.run.log_every = max(steps, 1)
    start = time.perf_counter()
    result = train(run)
    seconds = time.perf_counter() - start
    model, info = load_model(result.export)
    table = [("run's EMA", f"decay {run.ema.ema_decay:g}", "", score(name, steps, seconds, model, info, sampler, num_steps))]
    for sigma_rel in args.sigma_rels:
        rebuilt = reconstruct_ema(result.run_dir, sigma_rel)
        out = default_output(result.run_dir, rebuilt.step, sigma_rel)
        export_weights(rebuilt.weights, ModelInfo.from_dict(rebuilt.model_info), out,
                       extra={"posthoc_ema_reconstruction": rebuilt.record})
        model, info = load_model(out)
        table.append((f"σ_rel {sigma_rel:g}", f"γ {rebuilt.gamma:.2f}", f"{rebuilt.fit.relative_error:.2%}",
                      score(name, steps, seconds, model, info, sampler, num_steps)))
    print(f"\nEMA length on the digits demo, recipe {name}, {steps} steps, snapshots of σ_rel "
          f"{' and '.join(f'{s:g}' for s in run.posthoc.posthoc_sigma_rels)} every {args.posthoc_every} steps "
          f"({cpu_name()}); {table[0][3].sampler} with {table[0][3].model_calls} model calls, cfg {args.cfg_scale}")
    print("| EMA | profile | fit error | class match | Frechet (real floor) |\n|---|---|---|---|---|")
    for label, profile, error, row in table:
        print(f"| {label} | {profile} | {error} | {row.class_match:.1%} | {row.fd:.1f} ({row.fd_floor:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
