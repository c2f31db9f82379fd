"""`fastdit demo`: train a tiny class-conditional DiT on scikit-learn's 8x8 digits in pixel space, sample
every class with guidance, and judge the samples with a digit classifier. Minutes on a 2-core CPU.

Which real digits are used where (the split is `split_digits(labels, DIGITS_HELDOUT_FRACTION = 0.2, seed)`, class-balanced):

* the DiT trains on the "train" part (80%, 1,438 digits with seed 0), as `fastdit train --data-path
  digits` does;
* the classifier (the judge) trains on the "held-out" part (20%, 359 digits), which the DiT never saw,
  so it cannot reward a generator for copying its training digits;
* the classifier's accuracy is measured on the DiT's training digits: real digits the classifier never
  saw, and four times as many as the held-out part, so the accuracy is precise to a few tenths of a
  percent;
* the Frechet distance compares features of the samples with one half of those digits, next to the
  distance between the other half (cut to the number of samples) and that same half, so both numbers
  come from the same reference and the same sample sizes: the second is the floor the first can reach.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.digits import DIGITS_HELDOUT_FRACTION
from ..errors import UserError
from ..image_grid import as_rgb
from ..io import atomic_path, atomic_write_json, ensure_writable_dir, is_temporary
from ..run_folder import is_lock_file
from ..text import counted
from ..sampling.guidance import check_cfg_scale
from . import report as metrics
from .classifier import ClassifierOptions, classify, train_classifier, uint8_to_model_input
from .plots import read_loss_terms, save_class_grid, save_loss_plot

NUM_CLASSES = 10
GRID_COLUMNS = 20
TRAIN_RUN = "train"  # the training's run folder inside --out (`fastdit app` looks for the weights there)
@dataclass(frozen=True)
class ObjectiveRecipe:
    """An objective's best measured recipe on the digits (benchmarks/bench_convergence.py; the figures are
    in the README, "The digits demo's recipe"): what `fastdit demo --objective NAME` trains unless a flag
    says otherwise."""

    steps: int
    blocks: bool  # the LightningDiT blocks
    repa: bool
    sampler: str
    sampling_steps: int
    time_sampling: str = "logit-normal"  # flow and x-pred
    settings: dict = field(default_factory=dict)  # the objective's other settings


RECIPES = {
    # REPA at block 2 on flow matching with the blocks: 99.4% class match, Frechet 13.3 at 400 steps.
    "flow": ObjectiveRecipe(400, blocks=True, repa=True, sampler="heun", sampling_steps=9),
    # JiT's times (logit-normal, mean -0.8, std 0.8): 99.8% at 500 steps, where uniform-like times gave 88%.
    "x-pred": ObjectiveRecipe(500, blocks=True, repa=False, sampler="heun", sampling_steps=9,
                              settings={"logit_normal_mean": -0.8, "logit_normal_std": 0.8}),
    # DiT's IDDPM recipe with the official blocks: 99.2% at 1,000 steps, sampled with DDPM-25.
    "ddpm": ObjectiveRecipe(1000, blocks=False, repa=False, sampler="ddpm", sampling_steps=25),
    # MeanFlow, one model call: without REPA (with it the one-call samples were less varied: Frechet 32.1
    # against 21.7, class match 99.6% and 97.4%; README "MeanFlow").
    "meanflow": ObjectiveRecipe(400, blocks=True, repa=False, sampler="meanflow", sampling_steps=1),
}
# `fastdit demo --latent rae` (fastdit.demo.rae): RAE's DiT^DH-T with RAE's objective on the digit encoder's
# tokens, its times shifted for their 1,024 values against the pixels' 64 (benchmarks/bench_convergence.py,
# recipe "rae-latent"). Measured (2-core Xeon, one thread): 10% class match at 200 steps, 77% at 400, 100% at
# 600 (Frechet 26.4, real floor 6.9), 8.4 minutes in all; unshifted (RAE's base 4096: shift 0.5 for these
# small latents) it was still at 14% after 400 steps.
RAE_RECIPE = ObjectiveRecipe(600, blocks=False, repa=False, sampler="euler", sampling_steps=20,
                             settings={"time_shift_base": 64})
LATENTS = ("pixels", "rae")
# What the pixel demo's recipe measured (RECIPES["flow"] above; README), printed beside the RAE demo's figures.
PIXEL_REFERENCE = {"steps": 400, "class_match": 0.994, "frechet": 13.3}
# The sampler and steps each objective's recipe samples with, unless --sampler / --sampling-steps say otherwise.
# MeanFlow samples in one step: one model call, its guidance trained in (`train_config`).
RECIPE_SAMPLING = {name: (recipe.sampler, recipe.sampling_steps) for name, recipe in RECIPES.items()}
RECIPE_SAMPLING["rae"] = (RAE_RECIPE.sampler, RAE_RECIPE.sampling_steps)
# With --posthoc-ema, snapshot steps over the run (every steps // 16 steps): enough for `fastdit ema` and
# `fastdit sweep` to make any EMA length from them (EDM2 spreads its snapshots evenly the same way).
POSTHOC_SNAPSHOTS = 16


@dataclass
class DemoConfig:
    out: str = "fastdit-demo"
    # the DiT (DiT-T/2: depth 6, hidden 128, 4 heads, patch 2 -> 16 tokens per 8x8 digit)
    model: str = "DiT-T/2"
    # The recipe was chosen by measurement (benchmarks/bench_convergence.py; the figures are in the
    # README, "The demo"): flow matching with logit-normal times and the LightningDiT blocks reaches the
    # class sooner than DiT's IDDPM recipe, Heun at 16 model calls samples cheaper than DDPM-25 with
    # guidance, and representation alignment (below) takes the same recipe there in fewer steps.
    steps: int | None = None  # None: the objective's recipe's (RECIPES)
    batch_size: int = 128
    lr: float = 1e-3
    # A short run needs a short EMA: with 0.9999 the average would still be mostly the random
    # initial weights after 1,000 steps (0.9999^1000 = 0.90). The model still improves fast at the end,
    # so a ~100-step average (0.99) lags it least; 0.995 judged worse on the digits.
    ema_decay: float = 0.99
    # pixels, or an RAE latent space of the digit encoder's tokens (fastdit.demo.rae): then the model is
    # DiT^DH-T, the objective RAE's, and `fastdit train-decoder` trains the decoder first
    latent: str = "pixels"
    decoder_epochs: float | None = None  # --latent rae: the decoder's epochs (None: fastdit.demo.rae.DECODER's)
    # the process and blocks (recorded in the checkpoint; see `fastdit train --objective`, `--rope`, ...)
    objective: str | None = None  # None: flow in pixel space, rae in the RAE latent space
    time_sampling: str | None = None  # None: the objective's recipe's
    blocks: bool | None = None  # the LightningDiT blocks: RMSNorm, SwiGLU, 2-D RoPE, QK-norm; None: the recipe's
    objective_settings: dict | None = None  # the objective's other settings; None: the recipe's (x-pred: JiT's times)
    # REPA with the digits' own frozen encoder (fastdit.demo.encoder, trained in seconds on the DiT's
    # training split, never the judge), at block 2 of 6 with weight 1.0 and a projector of width 256
    # (REPA's 2048 is sized for XL and would cost more than this DiT); chosen against 0.5 and block 3 by
    # benchmarks/bench_convergence.py.
    # None: the objective's recipe's (on for flow; off for MeanFlow, whose one-call samples it left less varied).
    repa: bool | None = None
    repa_depth: int = 2
    repa_weight: float = 1.0
    repa_projector_dim: int = 256
    # EDM2's post-hoc EMA (`fastdit train --posthoc-ema`): snapshots from which `fastdit sweep` (or `fastdit
    # ema`) makes the EMA of any length after training; off by default, it changes nothing the demo judges.
    posthoc_ema: bool = False
    # sampling
    samples_per_class: int = 50
    # None: the objective's own (RECIPE_SAMPLING): ODE Heun on 9 grid points = 8 steps of 2 model calls
    # for flow (at 1,000 steps Heun with 8, 16 and 32 calls gave the same class match, 99.8%, and Frechet
    # 18.6 / 21.4 / 21.7), DDPM-25 for the IDDPM recipe (as the demo sampled before).
    sampler: str | None = None
    sampling_steps: int | None = None
    # Guidance trades diversity for class fidelity. Measured with the earlier DiT recipe (1,000 steps,
    # 500 samples, DDPM-50, EMA 0.99, on an AMD EPYC): cfg 2 -> 94.8% classified as their class, Frechet
    # distance 15.8; cfg 3 -> 99.8%, 36.1; cfg 4 -> 99.8%, 60.7 (real vs real: 7.4). Kept at 3 for both recipes.
    # MeanFlow trains it in instead, as its ω (Geng et al. 2025, section 4.2; their Table 1f's best is 3.0
    # too), and samples unguided.
    cfg_scale: float = 3.0
    # the judge (a small CNN, see classifier.py)
    classifier_epochs: int = ClassifierOptions.epochs
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        rae = self.latent == "rae"
        if self.objective is None:
            self.objective = "rae" if rae else "flow"
        if rae and self.model == DemoConfig.model:
            from .rae import MODEL

            self.model = MODEL
        recipe = RAE_RECIPE if rae else RECIPES.get(self.objective, RECIPES["flow"])
        for name in ("steps", "blocks", "repa", "time_sampling"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        if self.objective_settings is None:
            self.objective_settings = dict(recipe.settings)

    def sampling(self) -> tuple[str, int]:
        """(sampler, sampling steps): the ones given, else the objective's own."""
        sampler, steps = RECIPE_SAMPLING.get(self.objective, (None, 25))
        return self.sampler or sampler, self.sampling_steps or steps

    def validate(self) -> "DemoConfig":
        for name in ("steps", "batch_size", "classifier_epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise UserError(f"--sampling-steps must be >= 1, got {self.sampling_steps}")
        if self.samples_per_class < 2:
            raise UserError(f"--samples-per-class must be >= 2 (a covariance needs two samples), got {self.samples_per_class}")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        check_cfg_scale(self.cfg_scale)
        if self.latent not in LATENTS:
            raise UserError(f"--latent {self.latent!r}: choose {' or '.join(LATENTS)}")
        if self.latent == "rae":
            if self.objective != "rae":
                raise UserError(f"--latent rae trains RAE's DiT^DH with RAE's objective, not {self.objective!r}: leave "
                                "--objective out (or pass --objective rae)")
            if self.repa:
                raise UserError("--repa aligns a pixel-space DiT with the digit encoder; in its RAE latent space the "
                                "DiT diffuses that encoder's tokens themselves: leave --repa out")
            if self.decoder_epochs is not None and not self.decoder_epochs > 0:
                raise UserError(f"--decoder-epochs must be > 0, got {self.decoder_epochs}")
        elif self.decoder_epochs is not None:
            raise UserError("--decoder-epochs is for --latent rae (pixel space has no decoder)")
        return self

    def space(self) -> str:
        """The --vae of the training: pixels, or the RAE space of the demo's decoder run."""
        if self.latent != "rae":
            return "pixels"
        from .rae import DECODER_RUN

        return f"rae:{(Path(self.out) / DECODER_RUN).resolve()}"


@dataclass
class DemoResult:
    out_dir: Path
    files: dict[str, Path]
    report: dict


def train_config(config: DemoConfig):
    """The `fastdit train` run of the demo (with REPA, the digit encoder it names is made by
    `run_demo` before training)."""
    import dataclasses

    from ..models import LIGHTNINGDIT_BLOCKS
    from ..objectives import objective_class
    from ..train.config import TrainConfig
    from .encoder import digit_encoder_path

    alignment = {}
    if config.posthoc_ema:
        alignment.update(posthoc_ema=True, posthoc_every=max(1, config.steps // POSTHOC_SNAPSHOTS))
    if config.repa:
        alignment.update(repa=str(digit_encoder_path(config.out, config.seed)), repa_depth=config.repa_depth,
                         repa_weight=config.repa_weight, repa_projector_dim=config.repa_projector_dim)
    # The recipe's objective settings, each passed only to an objective that has it (the others refuse
    # a setting of another objective): the time sampling of flow and x-pred, MeanFlow's trained-in guidance.
    own = {field.name for field in dataclasses.fields(objective_class(config.objective))}
    recipe = {"time_sampling": config.time_sampling, "meanflow_omega": config.cfg_scale, **config.objective_settings}
    settings = {name: value for name, value in recipe.items() if name in own}
    # The sampling the demo judges the model with, recorded in its checkpoints (`fastdit sample --ckpt`
    # on the export samples as the demo did); MeanFlow's guidance is trained in, so it samples at cfg 1.
    sampler, sampling_steps = config.sampling()
    policy = objective_class(config.objective)(**settings).sampling
    sampling = dict(recipe_sampler=sampler, recipe_steps=sampling_steps,
                    recipe_cfg_scale=policy.cfg_scale(config.cfg_scale, conditional=True))
    return TrainConfig.create(**alignment, **settings, **sampling,
        objective=config.objective, **(LIGHTNINGDIT_BLOCKS if config.blocks else {}),
        model=config.model, image_size=8, num_classes=NUM_CLASSES, data_path="digits", vae=config.space(),
        global_batch_size=config.batch_size, lr=config.lr, ema_decay=config.ema_decay, max_steps=config.steps,
        global_seed=config.seed, num_workers=0, device=config.device,
        results_dir=str(config.out), run_name=TRAIN_RUN,
        log_every=max(1, min(10, config.steps // 20)), ckpt_every=config.steps, keep_last=1,
        tensorboard=False, progress=config.progress,
    )


def run_demo(config: DemoConfig) -> DemoResult:
    from ..checkpoint import load_model
    from ..devices import resolve_device
    from ..latents import PixelSpace, load_latent_space
    from ..sampling import SamplingOptions, generate
    from ..train.loop import train

    config.validate()
    sampler, sampling_steps = config.sampling()
    objective = train_config(config).build_objective()
    trained_guidance = objective.sampling.trained_guidance  # MeanFlow's, sampled at cfg 1
    options = SamplingOptions(sampler=sampler, num_steps=sampling_steps,
                              cfg_scale=objective.sampling.cfg_scale(config.cfg_scale, conditional=True))
    options.validate(objective)
    _refuse_a_folder_of_other_files(Path(config.out))
    out = ensure_writable_dir(config.out)
    device = resolve_device(config.device)
    _check_earlier_run(config)

    started, cpu_started = time.perf_counter(), time.process_time()
    decoder = None
    if config.latent == "rae":
        from .rae import train_digit_decoder

        decoder = train_digit_decoder(config)  # the encoder and its decoder: the latent space
    if config.repa:
        from .encoder import digit_encoder_file

        digit_encoder_file(out, config.seed)  # seconds, once per output folder
    run_config = train_config(config)
    trained = train(run_config)
    train_seconds = time.perf_counter() - started
    loss_weights = {"repa": run_config.alignment.repa_weight} if run_config.alignment.repa else {}

    model, info = load_model(trained.export, device=device)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), config.samples_per_class)  # class-major
    guidance = f"cfg {options.cfg_scale}" if trained_guidance is None else f"guidance {config.cfg_scale} trained in"
    print(f"sampling {counted(len(labels), 'image')} ({sampler}, {counted(sampling_steps, 'step')}, {guidance})", flush=True)
    sampling_start = time.perf_counter()
    space = PixelSpace(channels=1) if config.latent == "pixels" else load_latent_space(info.latent.vae, device=device)
    samples = generate(model, space, labels, options=options, objective=info.objective, seed=config.seed, device=device,
                       progress=config.progress)
    sampling_seconds = time.perf_counter() - sampling_start

    files = {
        "samples": _save_samples(samples, labels, out / "samples.npz"),
        "grid": save_class_grid(samples, labels, NUM_CLASSES, min(GRID_COLUMNS, config.samples_per_class), out / "grid.png"),
        # REPA adds λ·repa to the objective's loss: the plot shows the objective's own loss beside the sum.
        "loss_plot": save_loss_plot(*read_loss_terms(trained.run_dir / "metrics.jsonl", loss_weights),
                                    out / "loss.png", title=f"{config.model} on 8x8 digits"),
        "checkpoint": trained.export,
    }

    print("evaluating with a digit classifier trained on held-out real digits", flush=True)
    evaluation_start = time.perf_counter()
    judge = digits_judge(config.seed, config.classifier_epochs)
    result = judge.report(samples, labels)
    if decoder is not None:
        from .rae import reconstruction_report

        result["latent"] = {"space": decoder["space"], "decoder_steps": decoder["steps"],
                            "decoder_seconds": decoder["seconds"],
                            "reconstruction": reconstruction_report(space, judge, config.seed),
                            "pixel_reference": PIXEL_REFERENCE}
    evaluation_seconds = time.perf_counter() - evaluation_start

    result.update(
        config=asdict(config),
        sampling={**asdict(options), "sampler": options.resolved_sampler(info.objective),
                  "trained_guidance": trained_guidance},
        seconds={"train": round(train_seconds, 1), "sampling": round(sampling_seconds, 1),
                 "evaluation": round(evaluation_seconds, 1),
                 "total": round(time.perf_counter() - started, 1),
                 # CPU time of this process: on a shared machine, wall time says more about the neighbours
                 "cpu_total": round(time.process_time() - cpu_started, 1),
                 "torch_threads": torch.get_num_threads()},
        train={"steps": trained.step, "last_loss": trained.last_loss, "run_dir": str(trained.run_dir),
               "median_steps_per_sec": _median_steps_per_sec(trained.run_dir / "metrics.jsonl")},
        files={name: str(path) for name, path in files.items()},
    )
    files["report"] = out / "report.json"
    result["files"]["report"] = str(files["report"])
    atomic_write_json(result, files["report"])
    return DemoResult(out_dir=out, files=files, report=result)


def digits_judge(seed: int = 0, classifier_epochs: int = ClassifierOptions.epochs) -> "Judge":
    """The demo's judge: trained on the held-out digits of the split of `seed`, tested on the DiT's
    training digits (the module docstring); `fastdit sweep --metric digits` scores with it too."""
    from ..data import load_digits_tensors, split_digits
    from ..sampling import to_uint8

    images, real_labels = load_digits_tensors()
    real = uint8_to_model_input(to_uint8(images))  # the same uint8 rounding as the samples
    dit_train, heldout = split_digits(real_labels, DIGITS_HELDOUT_FRACTION, seed)
    return Judge(real, real_labels.numpy(), judge_train=heldout.numpy(), judge_test=dit_train.numpy(), seed=seed,
                 classifier_options=ClassifierOptions(epochs=classifier_epochs, seed=seed))


def evaluate_samples(samples: np.ndarray, sample_labels: np.ndarray, real: torch.Tensor, real_labels: np.ndarray, *,
                     judge_train: np.ndarray, judge_test: np.ndarray, seed: int = 0,
                     classifier_options: ClassifierOptions | None = None) -> dict:
    """The demo's report (without timings and paths): judge accuracy, class match and Frechet distances.

    `real` holds real images (N, 1, 8, 8) in [-1, 1]; `judge_train`/`judge_test` index it.
    """
    judge = Judge(real, real_labels, judge_train=judge_train, judge_test=judge_test, seed=seed,
                  classifier_options=classifier_options)
    return judge.report(samples, sample_labels)


class Judge:
    """A digit classifier trained on `judge_train` and tested on `judge_test`, kept to score any number
    of sample sets (the convergence benchmark scores many checkpoints against one judge)."""

    def __init__(self, real: torch.Tensor, real_labels: np.ndarray, *, judge_train: np.ndarray, judge_test: np.ndarray,
                 seed: int = 0, classifier_options: ClassifierOptions | None = None):
        classifier_options = classifier_options or ClassifierOptions(seed=seed)
        self.classifier = train_classifier(real[judge_train], torch.from_numpy(real_labels[judge_train]),
                                           classifier_options, NUM_CLASSES)
        self.test_predicted, self.test_features = classify(self.classifier, real[judge_test])
        self.test_accuracy = metrics.accuracy(self.test_predicted, real_labels[judge_test])
        self.num_train, self.num_test = int(len(judge_train)), int(len(judge_test))
        # Two halves of the judge's test digits: B is the reference; A, cut to the number of samples, gives
        # the real-vs-real distance with the same sample sizes (Frechet distances are biased by sample size).
        order = np.random.default_rng(seed).permutation(len(judge_test))
        self.half_a, self.half_b = order[: len(order) // 2], order[len(order) // 2:]

    def report(self, samples: np.ndarray, sample_labels: np.ndarray) -> dict:
        sample_predicted, sample_features = classify(self.classifier, uint8_to_model_input(samples))
        half_a = self.half_a[: len(samples)]
        reference = self.test_features[self.half_b]
        fd_samples = metrics.frechet_distance_of_features(sample_features, reference)
        fd_real = metrics.frechet_distance_of_features(self.test_features[half_a], reference)
        return {
            "classifier": {
                "test_accuracy": self.test_accuracy,
                "num_train": self.num_train,
                "num_test": self.num_test,
                "trained_on": "held-out real digits the DiT never saw",
                "tested_on": "the DiT's training digits (real digits the classifier never saw)",
                "feature_dim": int(self.test_features.shape[1]),
            },
            "num_samples": int(len(samples)),
            "class_match": metrics.accuracy(sample_predicted, sample_labels),
            "class_match_per_class": metrics.per_class_accuracy(sample_predicted, sample_labels, NUM_CLASSES),
            "frechet_distance": {
                "samples_vs_real": fd_samples,
                "real_vs_real": fd_real,
                "num_samples": int(len(samples)),
                "num_real_compared": int(len(half_a)),
                "num_reference": int(len(self.half_b)),
            },
        }


def _refuse_a_folder_of_other_files(out: Path) -> None:
    """The demo writes grid.png, report.json, ... into --out: only a new or empty folder, or one of an
    earlier demo (its training's config.json is there), may take them. Our own leftovers do not count:
    the training's lock file and temporaries, or its folder holding only those (a demo stopped early)."""
    if not out.is_dir() or (out / TRAIN_RUN / "config.json").is_file():
        return

    def others(folder: Path) -> list[Path]:
        return [entry for entry in folder.iterdir() if not is_lock_file(entry) and not is_temporary(entry)
                and not _made_before_training(entry)]

    found = others(out)
    if found == [out / TRAIN_RUN] and found[0].is_dir() and not others(found[0]):
        return
    if found:
        names = ", ".join(sorted(entry.name for entry in found)[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"--out {str(out)!r} holds other files ({names}) and no earlier demo; the demo would write "
                        "over them: choose a new or empty folder")


def _made_before_training(entry: Path) -> bool:
    """What a demo writes before its training's folder: the digit encoder (REPA's target, or the RAE space's
    encoder: `digit_encoder_path`) and, with --latent rae, the decoder's run folder (`fastdit.demo.rae`),
    whose config is written before its first step (one stopped earlier holds only our own leftovers)."""
    import re

    from .rae import DECODER_RUN

    if entry.is_file():
        return re.fullmatch(r"digit-encoder-seed\d+\.ts", entry.name) is not None
    if entry.name != DECODER_RUN or not entry.is_dir():
        return False
    leftovers = [path for path in entry.iterdir() if not is_lock_file(path) and not is_temporary(path)]
    return (entry / "config.json").is_file() or not leftovers


def _check_earlier_run(config: DemoConfig) -> None:
    """A folder from an earlier demo is reused (its training resumes or is skipped), but only with the
    same training settings; say so in the demo's own terms rather than the trainer's."""
    import json

    from ..train.config import TrainConfig

    stored_path = Path(config.out) / TRAIN_RUN / "config.json"
    if not stored_path.is_file():
        return
    try:
        stored = TrainConfig.from_dict(json.loads(stored_path.read_text()))
    except (ValueError, TypeError):
        return  # the trainer reports an unreadable run folder itself
    stored.refuse_other_run(
        train_config(config), f"{config.out!r} holds a demo trained",
        "choose another --out, or run with the same settings to reuse it",
    )


def _median_steps_per_sec(metrics_path: Path) -> float | None:
    # The median over logging windows: robust to a neighbour's job slowing a few windows down.
    import json

    rates = [json.loads(line).get("steps_per_sec") for line in metrics_path.read_text().splitlines() if line.strip()]
    rates = [r for r in rates if r is not None]
    return round(float(np.median(rates)), 3) if rates else None


def _save_samples(images: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    # The layout `fastdit sample-ddp` and the ADM evaluator use: arr_0 RGB images (the gray digits'
    # channel repeated, fastdit's rule for gray images: `as_rgb`), arr_1 labels.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, as_rgb(images.astype(np.uint8)), labels.astype(np.int64))
    return path
