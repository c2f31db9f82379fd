"""Sample N images for FID with any number of processes; image i's noise and label depend only on (seed, i).

The steps, and where processes wait for each other:

1. rank 0 locks the work folder, loads the model (downloading it once), checks or creates the work
   folder, drops damaged chunk files when resuming, and lists the images still to sample;
                                                                    broadcast (the list, or a refusal)
2. the other ranks load the model (from the cache now); every rank takes its share of the list
   (`fastdit.sample_ddp.shares`: contiguous runs of batches, within one batch of N/W images each, for
   any number of processes W) and writes each finished piece as a chunk file;
3. no collective while anyone samples (a rank that finishes first does not sit in a barrier that
   NCCL's watchdog would end): rank 0 watches the shared work folder until every piece of the deal is
   there, then streams the chunk files into the `.npz`, puts the settings beside it, drops the chunks
   and lets go of the lock; the other ranks watch for the `.npz`. Both waits give up after the process
   group's timeout (FASTDIT_DIST_TIMEOUT, `fastdit.distributed`) with one line, in case a process died
   where no launcher stops the rest.

What is reproducible:

* the noise of image i and its label (`fastdit.sampling.indexed`, the loop the FID of a training run
  samples with too) are a function of (seed, i) only, on every machine;
* on one machine, the same --batch-size (per process) and --chunk-size give the same bytes whatever
  the number of processes: batches start at chunk boundaries and every batch is sampled whole by one
  process, so every batch holds the same images;
* another batch size may round differently in the last bits (a matrix product over 2 rows and over 4
  rows may round differently on some CPUs and GPUs), which can move a pixel by one uint8 level; so can
  another machine, or resuming a killed run with another --batch-size.

With several machines, the output folder must be on a filesystem that all of them see.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import distributed as dist
from ..errors import UserError
from ..io import check_free_space, ensure_writable_dir
from ..precision import tf32, tf32_in_effect
from ..sampling import SamplingOptions, check_labels
from ..sampling.indexed import check_equal_labels, sample_by_index
from ..sampling.recipe import LABEL_SAMPLINGS
from . import shares, workdir
from .npz import write_adm_npz

POLL_SECONDS = 1.0  # how often a rank that waits looks at the shared folder


@dataclass
class SampleJob:
    out: Path  # the .npz to write
    num_samples: int
    options: SamplingOptions
    seed: int = 0
    batch_size: int = 32  # per process
    chunk_size: int = 1000  # images per chunk file: the unit of resuming and of work sharing
    class_labels: list[int] | None = None  # None: drawn by `label_sampling`; else cycled over the images
    label_sampling: str = "random"  # random (uniform per image) or equal (N / K per class): `sampling.indexed`
    png_dir: Path | None = None
    progress: bool = True
    # Not a setting (like the batch size): compiled blocks compute the same images up to rounding.
    compile: bool = False
    # TF32 matmuls on CUDA (Ampere and newer), as DiT's sample_ddp.py: recorded as used (a setting).
    tf32: bool = True
    # Where the settings came from (`ResolvedRecipe.to_dict`): recorded beside and inside the result,
    # not compared when resuming (the same values reached through a preset or through flags are the same run).
    recipe: dict | None = None

    def validate(self) -> None:
        for flag, value in (("--num-fid-samples", self.num_samples), ("--batch-size", self.batch_size), ("--chunk-size", self.chunk_size)):
            if value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")
        if self.class_labels is not None and not self.class_labels:
            raise UserError("--class-labels needs at least one label")
        if self.label_sampling not in LABEL_SAMPLINGS:
            raise UserError(f"unknown label sampling {self.label_sampling!r}; choose one of {', '.join(LABEL_SAMPLINGS)}")
        if self.png_dir is not None and Path(self.png_dir).exists() and not Path(self.png_dir).is_dir():
            raise UserError(f"--png-dir {str(self.png_dir)!r} is a file; give a folder")
        # The sampling options are checked against the model's objective once it is loaded (`_load_checked`).

    def settings(self, info, latent_space, fingerprint: str, device) -> dict:
        """What decides the images (see `workdir`): recorded in the work folder and beside the result."""
        return {
            "tf32": tf32_in_effect(device, self.tf32),
            "model": {"config": asdict(info.config), "latent": latent_space.name, "weights_sha256": fingerprint,
                      # under the key it had before objectives were objects (`workdir` reads old records)
                      "process": info.objective.to_dict()},
            "image_size": info.image_size,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "sampling": {**asdict(self.options), "sampler": self.options.resolved_sampler(info.objective)},
            # "uniform" is what random labels were recorded as before equal ones existed: old runs resume
            "labels": ({"random": "uniform"}.get(self.label_sampling, self.label_sampling) if self.class_labels is None
                       else list(self.class_labels)),
            "chunk_size": self.chunk_size,
            **({"recipe": self.recipe} if self.recipe is not None else {}),
        }


@dataclass
class SampleReport:
    out: Path
    num_samples: int
    image_size: int
    sampled: int  # images sampled by this run, all processes together (0 if everything was on disk)
    seconds: float  # from the start of sampling until every process's images were on disk
    world_size: int
    was_complete: bool = False  # the .npz was there already: nothing was done

    @property
    def images_per_second(self) -> float:
        return self.sampled / self.seconds if self.seconds > 0 else 0.0


def sample_ddp(job: SampleJob, load: Callable, info: dist.DistInfo) -> SampleReport | None:
    """Run `job` on this process; `load()` returns (model, model_info, latent_space, device).

    Returns a report on rank 0, None elsewhere. Leaves the process group to the caller.
    """
    job.validate()  # every check that needs no model, on every process, before any process waits for another
    if job.png_dir is not None:
        ensure_writable_dir(job.png_dir)  # now, not hours later in the middle of the run
    with contextlib.ExitStack() as held:  # rank 0's lock on the work folder, until the result is in place
        return _run(job, load, info, held)


def _run(job: SampleJob, load: Callable, info: dist.DistInfo, held: contextlib.ExitStack) -> SampleReport | None:
    paths = workdir.OutputPaths(Path(job.out))
    patience = dist.timeout_from_env()  # how long a rank waits for the others' files

    # 1. rank 0 first: a second run on this output stops before loading anything, a download happens
    #    once, and the work folder holds only usable chunks when rank 0 lists what is left to sample.
    recorded = {}  # rank 0: this run's settings, written into the result (the same bytes for the same run)

    def lock_load_and_check():
        held.enter_context(workdir.lock(paths))
        if job.png_dir is not None:  # before the model loads: a refused folder costs nothing
            workdir.claim_png_dir(Path(job.png_dir), paths.npz)
        loaded = _load_checked(job, load)
        settings = job.settings(loaded[1], loaded[2], workdir.weights_fingerprint(loaded[0]), loaded[3])
        recorded.update(settings)
        if workdir.is_finished(paths, settings):
            return loaded, None
        workdir.prepare(paths, settings)
        for path, problem in workdir.drop_damaged_chunks(paths, job.num_samples, job.chunk_size, _image_shape(loaded[1])):
            print(f"warning: chunk {str(path)!r} is damaged ({problem}); deleted it, its images are sampled again",
                  file=sys.stderr)
        _check_room(job, paths, loaded[1])
        # What is left, and the files on disk (whose PNGs a rerun that adds --png-dir writes): listed once.
        return loaded, {"pending": [(gap.start, gap.stop) for gap in workdir.pending(paths, job.num_samples)],
                        "done": [(chunk.start, chunk.stop) for chunk in workdir.chunk_files(paths)]}

    loaded, todo = _on_main_first(info, lock_load_and_check)  # loaded: None on the other ranks
    if todo is None:  # rank 0 found the result, made with these settings
        if not info.is_main:
            return None
        if paths.work_dir.exists():  # chunks of a run killed after the result was renamed in, or just our lock
            workdir.finish(paths)
        if job.png_dir is not None and not all(png_path(Path(job.png_dir), i).exists() for i in range(job.num_samples)):
            print(f"warning: {str(paths.npz)!r} was finished before; PNGs missing from {str(job.png_dir)!r} are not written "
                  f"(delete the .npz to sample again with --png-dir)", file=sys.stderr)
        return _report(job, paths, loaded, sampled=0, seconds=0.0, info=info, was_complete=True)

    # 2. my share of what is left; every rank computes the same deal from rank 0's list.
    if loaded is None:
        loaded = _load_checked(job, load)
    model, model_info, latent_space, device = loaded
    held.enter_context(tf32(device, job.tf32))
    gaps = [workdir.Chunk(first, end) for first, end in todo["pending"]]
    units = shares.batch_units(gaps, chunk_size=job.chunk_size, batch_size=job.batch_size)
    dealt = [shares.pieces(share, job.chunk_size) for share in shares.deal(units, info.world_size)]
    start = time.perf_counter()
    if job.png_dir is not None:  # a rerun that adds --png-dir: the PNGs of files sampled before
        done = [workdir.Chunk(first, end) for first, end in todo["done"]]
        for chunk in done[info.rank :: info.world_size]:
            _fill_missing_pngs(paths, chunk, Path(job.png_dir))
    _sample_pieces(job, paths, dealt[info.rank], model, model_info, latent_space, device, info)

    # 3. no collective: rank 0 waits for every piece on disk and assembles them; the others wait for the
    #    result (not for the pieces: rank 0 may have assembled and removed them before they look).
    if not info.is_main:
        _wait_for(paths.npz.exists, patience, f"{str(paths.npz)!r} (every process's images, assembled by process 0) "
                                              "did not appear")
        return None
    expected = [piece for share in dealt for piece, _ in share]
    _wait_for(lambda: workdir.is_complete(paths, expected), patience,
              f"the images of the other processes did not all reach {str(paths.work_dir)!r}")
    seconds = time.perf_counter() - start
    workdir.remove_stale_temporaries(paths)
    workdir.publish_settings(paths)
    files = workdir.chunk_files(paths)
    ends = [0] + [chunk.stop for chunk in files]  # each file starts where the one before ends
    if [chunk.start for chunk in files] != ends[:-1] or ends[-1] != job.num_samples:
        raise UserError(f"the chunk files in {str(paths.work_dir)!r} do not hold images 0 to {job.num_samples} once each; "
                        "rerun the same command to sample what is missing")
    write_adm_npz(paths.npz, (workdir.read_chunk(paths, chunk) for chunk in files), count=job.num_samples,
                  image_shape=_image_shape(model_info), settings={"format": workdir.FORMAT, **recorded})
    workdir.finish(paths)
    return _report(job, paths, loaded, sampled=sum(len(gap) for gap in gaps), seconds=seconds, info=info)


def _wait_for(condition: Callable[[], bool], patience, what: str) -> None:
    """Return once `condition()` holds, looking every POLL_SECONDS; a UserError after `patience` (a
    timedelta): a process died and no launcher stopped the others (torchrun does, srun may not)."""
    deadline = time.monotonic() + patience.total_seconds()
    while not condition():
        if time.monotonic() > deadline:
            raise UserError(f"{what} within {patience} (FASTDIT_DIST_TIMEOUT); did a process stop? "
                            "Rerun the same command to continue")
        time.sleep(POLL_SECONDS)


def _on_main_first(info: dist.DistInfo, step: Callable):
    """Run `step` on rank 0 while the others wait; it returns (its own result, a value for every rank).
    Returns (the result on rank 0 and None elsewhere, the value). If it raises a UserError, every
    process stops: rank 0 prints the message; the others leave quietly with the same exit status,
    instead of each crashing with a "connection closed by peer" traceback.
    """
    result, value, error = None, None, None
    if info.is_main:
        try:
            result, value = step()
        except UserError as err:
            error = err
    if dist.is_initialized():
        import torch.distributed

        shared = [None if error is None else str(error), value]
        torch.distributed.broadcast_object_list(shared, src=0)  # doubles as the barrier
        if shared[0] is not None and not info.is_main:
            raise SystemExit(2)
        value = shared[1]
    if error is not None:
        raise error
    return result, value


def _load_checked(job: SampleJob, load: Callable):
    model, model_info, latent_space, device = load()
    job.options.validate(model_info.objective)
    if job.class_labels is not None:
        check_labels(job.class_labels, model_info.config.num_classes)
    elif job.label_sampling == "equal":
        check_equal_labels(job.num_samples, model_info.config.num_classes)
    if model_info.latent.kind == "pixels" and model_info.config.in_channels not in (1, 3):
        raise UserError(f"a pixel-space model with {model_info.config.in_channels} channels does not make RGB images; "
                        "sample-ddp writes images for FID (1 or 3 channels)")
    return model, model_info, latent_space, device


def _check_room(job: SampleJob, paths: workdir.OutputPaths, model_info) -> None:
    """Refuse, before sampling, a job whose files cannot fit: the chunks still to write plus the final
    `.npz` (the chunks stay on disk until it is whole), plus as many PNGs where --png-dir is given (their
    uncompressed size bounds them). 50K images at 512 px are 39 GB twice over; better said now than after
    hours of sampling."""
    image_bytes = int(np.prod(_image_shape(model_info)))
    left = sum(len(gap) for gap in workdir.pending(paths, job.num_samples))
    check_free_space(paths.npz.parent, (left + job.num_samples) * image_bytes,
                     f"{job.num_samples} images at {model_info.image_size} px (chunks, then the .npz)",
                     "free space, choose another --out or ask for fewer with --num-fid-samples")
    if job.png_dir is not None:
        check_free_space(job.png_dir, left * image_bytes, f"the PNGs of {left} images",
                         "free space or choose another --png-dir")


def _image_shape(model_info) -> tuple[int, int, int]:
    """The shape of one image in the chunks and the `.npz`: always RGB (`sampling.indexed.as_rgb`)."""
    return (model_info.image_size, model_info.image_size, 3)


def _sample_pieces(job, paths, pieces, model, model_info, latent_space, device, info) -> None:
    """Sample this rank's pieces, each unit as one batch, and write each piece as a chunk file."""
    from tqdm import tqdm

    desc = "sample-ddp" if info.world_size == 1 else f"sample-ddp (rank 0 of {info.world_size})"
    bar = tqdm(total=sum(len(piece) for piece, _ in pieces), unit="img", desc=desc, dynamic_ncols=True,
               disable=not (job.progress and info.is_main))
    for piece, units in pieces:
        images, labels = [], []
        for unit in units:  # one batch each: the same batch whatever the number of processes
            [(_, batch_labels, batch)] = sample_by_index(
                model, latent_space, range(unit.start, unit.stop), seed=job.seed, batch_size=len(unit),
                options=job.options, objective=model_info.objective, class_labels=job.class_labels,
                label_sampling=job.label_sampling, num_samples=job.num_samples, device=device, compile=job.compile)
            images.append(batch)
            labels.append(batch_labels)
            bar.update(len(unit))
        images, labels = np.concatenate(images), np.concatenate(labels)
        if job.png_dir is not None:  # before the chunk file: a finished chunk always has its PNGs
            _write_pngs(Path(job.png_dir), piece.start, images)
        workdir.write_chunk(paths, piece, images, labels)
    bar.close()


def png_path(png_dir: Path, index: int) -> Path:
    return png_dir / f"{index:06d}.png"


def _write_pngs(png_dir: Path, first_index: int, images: np.ndarray, only_missing: bool = False) -> None:
    from PIL import Image

    from ..io import atomic_save_png

    for offset, image in enumerate(images):
        path = png_path(png_dir, first_index + offset)
        if not (only_missing and path.exists()):
            atomic_save_png(Image.fromarray(image), path)


def _fill_missing_pngs(paths, chunk, png_dir: Path) -> None:
    """A rerun that adds --png-dir: write the PNGs of chunks sampled before."""
    if all(png_path(png_dir, index).exists() for index in range(chunk.start, chunk.stop)):
        return
    images, _ = workdir.read_chunk(paths, chunk)
    _write_pngs(png_dir, chunk.start, images, only_missing=True)


def _report(job, paths, loaded, *, sampled, seconds, info, was_complete=False) -> SampleReport:
    return SampleReport(out=paths.npz, num_samples=job.num_samples, image_size=loaded[1].image_size,
                        sampled=sampled, seconds=seconds, world_size=info.world_size, was_complete=was_complete)
