"""Run a sweep: sample every point with few images and score it, confirm the best with the full count,
and write the table, the plot and the winner's recipe.

Every point is one `fastdit sample-ddp` job (`fastdit.sample_ddp.sample_ddp`) into
`<out>/samples/<point>-n<count>.npz`, so what sample-ddp promises holds for each point: image i's noise
and label depend on (seed, i) only, any number of processes writes the same bytes at one batch size, and
a killed job continues from its finished chunks. Every point uses the same seed, so two points differ
only by their settings, not by their noise (common random numbers: the comparison is sharper than the
metric's own spread at the count). Under torchrun every process samples a share of each point; the main
process scores it, records it in the state file (`fastdit.sweep.state`) and writes the results.

Each point is sampled as `sample-ddp --recipe` samples a recipe file holding its settings: the point's
values over the preset or the checkpoint's recipe, then that recipe as the source layer, named after the
point. So the recipe file written for the winner makes `sample-ddp --recipe FILE` write the winner's
`.npz` byte for byte, the settings it records included.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import distributed as dist
from ..errors import UserError
from ..io import atomic_write_text, ensure_writable_dir
from ..sampling.recipe import FID_CFG_SCALE, SAMPLING_FIELDS, RecipeSource, checkpoint_source, resolve, write_recipe_file
from .report import Row, ranked, save_plot, table_lines
from .scoring import check_metric, make_scorer, scorer_columns, scorer_identity
from .space import Point, SweepSpace
from .state import SweepState
from .weights import SweepSource, make_weights, weights_path

SAMPLES_FOLDER = "samples"
TABLE_FILE, PLOT_FILE, RECIPE_FILE = "sweep.md", "sweep.png", "recipe.json"
# sample-ddp's defaults under its recipe layers (its cfg 1.5, DiT's sample_ddp.py): the recipe of a point
# must resolve as `sample-ddp --recipe` resolves it.
SAMPLE_DDP_DEFAULTS = {"cfg_scale": FID_CFG_SCALE}
RECIPE_KEYS = (*SAMPLING_FIELDS, "label_sampling", "num_samples")


@dataclass
class SweepJob:
    out: Path
    source: SweepSource
    space: SweepSpace
    metric: str = "mind"
    ref: str | None = None
    inception_weights: str | None = None
    preset: str | None = None  # a sampling preset in place of the checkpoint's recipe, under every point
    fixed: dict = field(default_factory=dict)  # recipe fields set for every point outside the axes (guided channels)
    num_samples: int = 5000  # per point
    confirm: int = 2  # the best points sampled again with confirm_samples
    confirm_samples: int = 50_000
    seed: int = 0
    batch_size: int = 32
    chunk_size: int = 1000
    label_sampling: str = "random"
    keep_samples: bool = False  # keep every point's .npz (the confirmations are always kept)
    progress: bool = True

    def validate(self) -> None:
        check_metric(self.metric, self.ref)
        for flag, value, low in (("--num-samples", self.num_samples, 2), ("--confirm", self.confirm, 0),
                                 ("--confirm-samples", self.confirm_samples, 2), ("--batch-size", self.batch_size, 1),
                                 ("--chunk-size", self.chunk_size, 1)):
            if value < low:
                raise UserError(f"{flag} must be >= {low}, got {value}")
        if self.confirm and self.confirm_samples <= self.num_samples:
            raise UserError(f"--confirm-samples ({self.confirm_samples}) must be more than --num-samples "
                            f"({self.num_samples}): the confirmation samples the best points again with the full count "
                            "(or --confirm 0 for none)")

    def identity(self) -> dict:
        """What every score depends on besides its point (`SweepState`)."""
        return {**self.source.identity(), **scorer_identity(self.metric, self.ref), "preset": self.preset,
                "fixed": dict(self.fixed), "seed": self.seed, "batch_size": self.batch_size,
                "chunk_size": self.chunk_size, "label_sampling": self.label_sampling}


@dataclass
class SweepResult:
    rows: list[Row]
    winner: Row
    files: dict[str, Path]
    table: list[str]
    sampled: int  # points (and confirmations) sampled by this run
    before: int  # points already scored when it started


def run_sweep(job: SweepJob, info: dist.DistInfo) -> SweepResult | None:
    """Run `job` on this process; the result on the main process, None elsewhere."""
    from ..run_folder import exclusive_lock_for_all_ranks

    job.validate()
    points = job.space.points()
    by_name = {point.name: point for point in points}
    with exclusive_lock_for_all_ranks(ensure_writable_dir(job.out), "fastdit sweep", info):
        return _run(job, points, by_name, info)


def _run(job: SweepJob, points: list[Point], by_name: dict, info: dist.DistInfo) -> SweepResult | None:
    state: SweepState | None = None  # the main process's
    cache: dict = {}  # the weights loaded last: {path: LoadedModel}

    def start():
        nonlocal state
        state = SweepState(job.out, job.identity())
        for point in points:  # every weights file there, or makeable, before anything is sampled
            weights_path(point.weights, job.source, job.out)
        pending = [point for point in points if state.score(point, job.num_samples) is None]
        if not job.keep_samples:  # a sweep killed between a score and dropping its samples left them
            for point in points:
                if point not in pending:
                    _drop(sample_path(job, point, job.num_samples))
        if pending:  # every point's settings checked against the model now, not after hours of others
            loaded = _load(job, pending[0], info, cache)
            for point in pending:
                _check_point(job, point, loaded.info)
            if job.label_sampling == "equal":
                from ..sampling.indexed import check_equal_labels

                for count in (job.num_samples, job.confirm_samples) if job.confirm else (job.num_samples,):
                    check_equal_labels(count, loaded.info.config.num_classes)
        return [point.name for point in pending]

    pending = share_from_main(info, start)
    before = len(points) - len(pending)
    scoring = _Scoring(job, info)
    if info.is_main:
        swept = ", ".join(job.space.swept) + " swept" if job.space.swept else "nothing swept"
        fixed = f"; fixed: {job.space.describe_fixed()}" if job.space.describe_fixed() else ""
        confirm = f"the best {job.confirm} again at {job.confirm_samples}" if job.confirm else "no confirmation"
        print(f"sweep: {len(points)} points ({swept}{fixed}), {before} scored before; {scoring.columns.label} at "
              f"{job.num_samples} samples, {confirm}", flush=True)
    bar = _bar(job, info, total=len(pending) + job.confirm)
    for name in pending:
        point = by_name[name]
        npz = _sample(job, point, job.num_samples, info, cache)
        dist.barrier()  # every process has seen the .npz (sample-ddp's others wait for it) before it may go
        if info.is_main:
            scoring.record(state, point, job.num_samples, npz, bar)
            if not job.keep_samples:
                _drop(npz)
        bar.update(1)

    def choose():
        rows = [Row(point, state.score(point, job.num_samples)) for point in points]
        best = [row.point for row in ranked(rows, scoring.columns.metric)[: job.confirm]]
        return [(point.name, state.score(point, job.confirm_samples) is None) for point in best]

    confirm = share_from_main(info, choose) if job.confirm else []
    bar.total = len(pending) + len(confirm)
    bar.refresh()
    sampled = len(pending)
    for name, needed in confirm:
        point = by_name[name]
        if needed:
            npz = _sample(job, point, job.confirm_samples, info, cache)
            if info.is_main:
                scoring.record(state, point, job.confirm_samples, npz, bar)
            sampled += 1
        bar.update(1)
    bar.close()
    if not info.is_main:
        return None
    return _finish(job, state, points, [by_name[name] for name, _ in confirm], scoring.columns, sampled, before)


class _Scoring:
    """The main process's scorer, built when the first sample set needs it (a finished sweep run again
    builds none), and one line per score."""

    def __init__(self, job: SweepJob, info: dist.DistInfo):
        self.job, self.info, self._scorer = job, info, None
        self.columns = scorer_columns(job.metric)

    def record(self, state: SweepState, point: Point, count: int, npz: Path, bar) -> None:
        if self._scorer is None:
            self._scorer = make_scorer(self.job.metric, self.job.ref, inception_weights=self.job.inception_weights,
                                       device=self.info.device)
        scores = self._scorer.score(npz)
        state.record(point, count, scores, _recorded_recipe(npz))
        columns = self.columns
        words = ", ".join([f"{columns.label} {scores[columns.metric]:.4g}"] +
                          [f"{name} {form.format(scores[key])}" for key, name, form in columns.others])
        bar.write(f"{point.name} ({count} samples): {words}")


def _recorded_recipe(npz: Path) -> dict:
    """The recipe values a point was sampled with, as the `.npz` records them (less the count)."""
    from ..sample_ddp.npz import read_settings

    settings = read_settings(npz) or {}
    values = (settings.get("recipe") or {}).get("values") or {}
    return {key: values[key] for key in RECIPE_KEYS if key in values and key != "num_samples"}


def point_recipe(job: SweepJob, point: Point, count: int, info):
    """The recipe `point` is sampled with at `count` images (`ResolvedRecipe`): its values over the preset
    or `info`'s recorded recipe, then those as a recipe file's source, as `sample-ddp --recipe` reads it."""
    from ..sampling.presets import get_preset

    if job.preset:
        preset = get_preset(job.preset)
        source = RecipeSource(f"preset {preset.name}", {k: v for k, v in preset.recipe.items()
                                                        if k not in ("model", "image_size")}, preset=preset.name)
    else:
        source = checkpoint_source(info.sampling)
    flags = {**job.fixed, **point.recipe_values, "label_sampling": job.label_sampling, "num_samples": count}
    values = resolve(SAMPLE_DDP_DEFAULTS, source, flags).values
    return resolve(SAMPLE_DDP_DEFAULTS, RecipeSource(f"recipe {point.name}", {key: values[key] for key in RECIPE_KEYS}),
                   {})


def _load(job: SweepJob, point: Point, info: dist.DistInfo, cache: dict):
    """The weights of `point`, loaded once for the points that share them. The main process loads first
    (sample-ddp's order), so it makes a reconstruction that the others then read."""
    from ..loading import load_for_sampling

    path = (make_weights if info.is_main else weights_path)(point.weights, job.source, job.out)
    if path not in cache:
        cache.clear()  # one model in memory at a time: the points of one weights file follow each other
        cache[path] = load_for_sampling(str(path), device=info.device)
    return cache[path]


def _check_point(job: SweepJob, point: Point, info) -> None:
    from ..errors import OptionError

    try:
        point_recipe(job, point, job.num_samples, info).options().validate(info.objective)
    except OptionError as err:
        raise err.within(f"point {point.name}: ") from None
    except UserError as err:
        raise UserError(f"point {point.name}: {err}") from None


def sample_path(job: SweepJob, point: Point, count: int) -> Path:
    return job.out / SAMPLES_FOLDER / f"{point.name}-n{count}.npz"


def _sample(job: SweepJob, point: Point, count: int, info: dist.DistInfo, cache: dict) -> Path:
    """Sample `point` with `count` images on every process (one sample-ddp job); returns its `.npz`."""
    from ..sample_ddp import SampleJob, sample_ddp
    from ..sampling import SamplingOptions

    npz = sample_path(job, point, count)
    sample_job = SampleJob(out=npz, num_samples=count, options=SamplingOptions(), seed=job.seed,
                           batch_size=job.batch_size, chunk_size=job.chunk_size, label_sampling=job.label_sampling,
                           progress=False)

    def load():
        loaded = _load(job, point, info, cache)
        resolved = point_recipe(job, point, count, loaded.info)
        sample_job.options, sample_job.recipe = resolved.options(), resolved.to_dict()
        return loaded

    sample_ddp(sample_job, load, info)
    return npz


def _finish(job: SweepJob, state: SweepState, points: list[Point], confirmed: list[Point], columns, sampled: int,
            before: int) -> SweepResult:
    """The table, the plot and the winner's recipe (the best confirmed point, else the best point)."""
    rows = [Row(point, state.score(point, job.num_samples), state.score(point, job.confirm_samples) if point in confirmed
                else None) for point in points]
    full = [row for row in rows if row.full is not None]
    if full:
        winner = min(full, key=lambda row: (row.full[columns.metric], row.point.name))
        count, scores = job.confirm_samples, winner.full
    else:
        winner = ranked(rows, columns.metric)[0]
        count, scores = job.num_samples, winner.cheap
    table = [f"Sweep of {_described(job.source)}: {columns.label} (lower is better) at {job.num_samples} samples per "
             f"point, seed {job.seed}" + (f"; the best {len(full)} again at {job.confirm_samples}" if full else "")
             + (f"; fixed: {job.space.describe_fixed()}" if job.space.describe_fixed() else ""), ""]
    table += table_lines(rows, job.space.swept, columns, (job.num_samples, job.confirm_samples if full else None), winner)
    files = {"table": job.out / TABLE_FILE, "state": state.path}
    atomic_write_text("\n".join(table) + "\n", files["table"])
    if importlib.util.find_spec("matplotlib") is not None:
        files["plot"] = save_plot(rows, job.space.swept, columns, job.num_samples, winner, job.out / PLOT_FILE)
    else:
        print("warning: no plot: it needs matplotlib (pip install 'fastdit[demo]')", file=sys.stderr)
    recipe = {**state.points[winner.point.name]["recipe"], "num_samples": count}
    samples = sample_path(job, winner.point, count)  # kept: a confirmation's, or every point's with --keep-samples
    files["recipe"] = write_recipe_file(
        job.out / RECIPE_FILE, winner.point.name, recipe, ckpt=weights_path(winner.point.weights, job.source, job.out),
        job={"seed": job.seed, "batch_size": job.batch_size, "chunk_size": job.chunk_size},
        record={"sweep": str(job.out), "metric": job.metric, "scores": scores, "num_samples": count,
                "samples": str(samples) if samples.is_file() else None})
    return SweepResult(rows=rows, winner=winner, files=files, table=table, sampled=sampled, before=before)


def _drop(npz: Path) -> None:
    """A scored point's samples and the settings sample-ddp wrote beside them."""
    for path in (npz, npz.with_suffix(".json")):
        path.unlink(missing_ok=True)


def _described(source: SweepSource) -> str:
    return f"run {str(source.run)!r}" if source.run is not None else f"{str(source.ckpt)!r}"


def share_from_main(info: dist.DistInfo, compute: Callable):
    """`compute()` on the main process, its value on every process. A UserError there stops every
    process: the main one raises it (one line from the CLI), the others leave with status 2."""
    value, error = None, None
    if info.is_main:
        try:
            value = compute()
        except UserError as err:
            error = err
    if dist.is_initialized():
        import torch.distributed

        shared = [None if error is None else str(error), value]
        torch.distributed.broadcast_object_list(shared, src=0)
        if shared[0] is not None and not info.is_main:
            raise SystemExit(2)
        value = shared[1]
    if error is not None:
        raise error
    return value


def _bar(job: SweepJob, info: dist.DistInfo, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="point", desc="sweep", dynamic_ncols=True, disable=not (job.progress and info.is_main))
