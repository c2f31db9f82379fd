"""Encode an image folder with the VAE (or an RAE's encoder) into a sharded latent store, on every process
of a torchrun job.

Every process encodes its share of the missing shards (r, r + W, ... of that list for rank r of W);
shard contents depend only on the sorted file list, so any number of processes writes the same store.
Running the same command again continues a killed extraction; a finished store is checked and left as
it is. `fastdit.data.latent_store` describes the layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import UserError
from .latent_store import DEFAULT_DTYPE, DEFAULT_SHARD_SIZE


@dataclass(frozen=True)
class ExtractConfig:
    data_path: str
    features_path: str
    image_size: int = 256
    vae: str = "ema"  # "ema"/"mse" (the SD VAEs DiT uses), a hub id, a local diffusers folder, or "rae:..."
    batch_size: int = 32  # images per VAE call and process; each is encoded together with its flip
    shard_size: int = DEFAULT_SHARD_SIZE
    num_workers: int = 4
    dtype: str = DEFAULT_DTYPE
    skip_corrupt: bool = False
    with_images: bool = False  # also store each crop the VAE encoded (PNG), for REPA-style encoders
    verify: bool = False  # read every item of the finished store whole (`latent_store.verify_store`)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for flag, value in (("--image-size", self.image_size), ("--batch-size", self.batch_size),
                            ("--shard-size", self.shard_size)):
            if value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be 0 or more, got {self.num_workers}")
        if self.dtype not in ("float16", "float32"):
            raise UserError(f"--dtype must be float16 or float32, got {self.dtype!r}")



def extract_latents(config: ExtractConfig) -> dict | None:
    """Write (or finish) the latent store; returns its metadata on the main process, None elsewhere."""
    from .. import distributed as dist

    info = dist.init_from_env(config.device)
    # On an error we leave without the closing barrier: the other processes may never reach it, and
    # torchrun stops the whole job when one process fails.
    meta = _extract(config, info)
    dist.shutdown()
    return meta


def _extract(config: ExtractConfig, info) -> dict | None:
    import torch

    from .. import distributed as dist
    from .image_folder import list_image_folder
    from .latent_store import (
        StorePlan,
        files_digest,
        finalize_store,
        format_size,
        normalize_vae_name,
        open_for_writing,
        size_on_disk,
    )
    from ..latents import check_image_size, load_latent_space

    index = list_image_folder(config.data_path, exclude={config.features_path: "--features-path"})  # no class
    check_image_size(config.vae, config.image_size)  # before the weights are loaded (or downloaded)
    space = load_latent_space(config.vae, channels=3, device=info.device)  # the crops are RGB (load_crop)
    latent_size = space.latent_size(config.image_size)
    plan = StorePlan(
        vae=normalize_vae_name(space.name),
        scale_factor=float(space.scale_factor),
        image_size=config.image_size,
        latent_shape=(space.channels, latent_size, latent_size),
        dtype=config.dtype,
        shard_size=config.shard_size,
        num_sources=len(index.files),
        class_names=index.class_names,
        files_digest=files_digest(index),
        with_images=config.with_images,
        # A space that does not say it is deterministic is stored with its posterior std.
        posterior_std=not getattr(space, "deterministic", False),
    )
    # The main process starts (or checks) the store first; then all list the missing shards before any
    # writes one, so that every process sees the same list and splits it the same way.
    if info.is_main:
        pending = open_for_writing(config.features_path, plan)
        _check_room(config.features_path, plan, pending)
    dist.barrier()
    if not info.is_main:
        pending = open_for_writing(config.features_path, plan, is_main=False)
    dist.barrier()

    start = time.perf_counter()
    encoded, corrupt = _encode_shards(config, info, index, plan, space, pending[info.rank :: info.world_size])
    # Every process finishes its shards before any reports corrupt images, so no finished work is lost.
    totals = dist.all_reduce_sum(torch.tensor([encoded, len(corrupt)], dtype=torch.float64, device=info.device))
    if totals[1]:
        raise _corrupt_images_error(corrupt, int(totals[1]))
    elapsed = time.perf_counter() - start
    dist.barrier()  # every shard is on disk before the main process checks them
    if not info.is_main:
        return None
    meta = finalize_store(config.features_path, plan, data_path=config.data_path)
    if config.verify:
        from .latent_store import verify_store

        verify_store(config.features_path, progress=config.progress)
    skipped = f", {len(meta['skipped'])} corrupt image(s) skipped" if meta["skipped"] else ""
    images = ", crops stored" if plan.with_images else ""
    images += ", every item verified" if config.verify else ""
    total = int(totals[0])
    speed = f"{total} encoded in {elapsed:.1f} s, {total / max(elapsed, 1e-9):.1f} images/s"
    print(
        f"latent store {config.features_path!r}: {meta['count']} images in {len(meta['shards'])} shard(s)"
        f"{skipped}{images}, {format_size(size_on_disk(config.features_path))} on disk "
        f"({speed if total else 'nothing left to encode'})"
    )
    return meta


# PNG crops of photographs take 60-75% of their raw RGB bytes (the `--with-images` help): the upper end.
PNG_SHARE = 0.75


def _check_room(folder: str, plan, pending: list[int]) -> None:
    """Say what the shards still to write will take, and refuse to start when the disk cannot hold it."""
    from ..io import check_free_space
    from .latent_store import format_size

    count = sum(len(plan.shard_sources(shard)) for shard in pending)
    if not count:
        return
    per_image = plan.item_bytes() + (int(PNG_SHARE * 3 * plan.image_size**2) if plan.with_images else 0)
    c, h, w = plan.latent_shape
    what = (f"{c}x{h}x{w} {plan.dtype} latents of each image and its flip"
            + (" (mean and std)" if plan.posterior_std else "") + (", and its crop" if plan.with_images else ""))
    needed = count * per_image
    print(f"encoding {count} images into {folder!r}: about {format_size(needed)} to write "
          f"({format_size(per_image)} each: {what})", flush=True)
    fix = "free some space or choose another --features-path"
    if plan.dtype == "float32":
        fix += " (--dtype float16 halves the latents)"
    check_free_space(folder, needed, f"the {count} images still to encode ({what})", fix)


def _corrupt_images_error(corrupt: list[tuple[str, str]], total: int) -> UserError:
    """`corrupt` holds (file, reason) pairs: the reason tells a damaged file from a refused pixel mode."""
    if not corrupt:
        return UserError(f"{total} image(s) could not be read by other processes (named in their messages)")
    listed = ", ".join(f"{path!r} ({reason})" for path, reason in corrupt[:10])
    listed += f" and {len(corrupt) - 10} more" if len(corrupt) > 10 else ""
    return UserError(
        f"{len(corrupt)} image(s) could not be read: {listed}; fix or remove them, or rerun with --skip-corrupt "
        f"to leave them out (the shards without them are written and will be kept)"
    )


class _SourceImages:
    """The sorted file list as a map-style dataset that reports unreadable files (with the reason) instead
    of raising; images of a refused pixel mode count as unreadable, so --skip-corrupt leaves them out too.

    Item i is (image (3, S, S) in [-1, 1], label, i, error, png): `png` holds the crop's PNG file when
    `with_images` (b"" otherwise), compressed here in the loader's workers, beside the decoding."""

    def __init__(self, index, image_size: int, with_images: bool = False):
        self.index = index
        self.image_size = image_size
        self.with_images = with_images

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, i: int):
        import torch

        from .image_folder import CorruptImageError, load_crop, pixels_to_unit_range
        from .latent_store import encode_png

        try:
            pixels, error = load_crop(self.index.root / self.index.files[i], self.image_size), ""
        except CorruptImageError as err:
            pixels, error = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), err.reason
        png = encode_png(pixels) if self.with_images and not error else b""
        return pixels_to_unit_range(pixels), self.index.labels[i], i, error, png


def _encode_shards(
    config: ExtractConfig, info, index, plan, space, shards: list[int]
) -> tuple[int, list[tuple[str, str]]]:
    """Encode and write `shards`; returns (images encoded, (file, reason) of each unreadable image in the
    shards left unwritten)."""
    import torch
    from tqdm import tqdm

    from .latent_store import DTYPES, write_shard

    # Batches never cross a shard boundary and start at its first image, so each image is encoded in
    # the same batch whatever the number of processes.
    batches, batch_shard = [], []
    for shard in shards:
        sources = list(plan.shard_sources(shard))
        for start in range(0, len(sources), config.batch_size):
            batches.append(sources[start : start + config.batch_size])
            batch_shard.append(shard)
    loader = torch.utils.data.DataLoader(
        _SourceImages(index, plan.image_size, plan.with_images),
        batch_sampler=batches,
        num_workers=config.num_workers,
        pin_memory=info.device.type == "cuda",
    )
    bar = tqdm(
        total=sum(len(batch) for batch in batches),
        unit="img",
        desc=f"extract (rank 0 of {info.world_size})" if info.is_distributed else "extract",
        disable=not (config.progress and info.is_main),
        dynamic_ncols=True,
    )
    dtype = DTYPES[plan.dtype]
    encoded, unwritten_corrupt = 0, []
    parts, corrupt = [], []  # of the shard being filled
    for b, (images, labels, sources, errors, pngs) in enumerate(loader):
        ok = torch.tensor([not error for error in errors], dtype=torch.bool)
        corrupt += [(index.files[int(source)], error) for source, error in zip(sources, errors) if error]
        if ok.any():
            x = images[ok].to(info.device, non_blocking=True)
            n = len(x)
            mean, std = space.encode_moments(torch.cat([x, x.flip(-1)]))  # (2n, C, h, w): originals, then flips
            parts.append((
                torch.stack([mean[:n], mean[n:]], dim=1).to("cpu", dtype),  # (n, 2, C, h, w)
                torch.stack([std[:n], std[n:]], dim=1).to("cpu", dtype) if plan.posterior_std else None,
                labels[ok],
                sources[ok],
                [png for png, good in zip(pngs, ok.tolist()) if good],
            ))
            encoded += n
        bar.update(len(errors))
        if b + 1 == len(batches) or batch_shard[b + 1] != batch_shard[b]:  # the shard is complete
            if corrupt and not config.skip_corrupt:
                unwritten_corrupt += corrupt
            else:
                write_shard(config.features_path, batch_shard[b], **_concat(parts, plan, dtype),
                            skipped=[path for path, _ in corrupt])
            parts, corrupt = [], []
    bar.close()
    return encoded, unwritten_corrupt


def _concat(parts: list[tuple], plan, dtype) -> dict:
    """One shard's tensors (and PNG files, in a store with images) from its batches; empty when every
    image of the shard was skipped."""
    import torch

    images = [png for part in parts for png in part[4]] if plan.with_images else None
    if not parts:
        moments = torch.zeros(0, 2, *plan.latent_shape, dtype=dtype)
        return {"mean": moments, "std": moments if plan.posterior_std else None,
                "label": torch.zeros(0, dtype=torch.int64), "source": torch.zeros(0, dtype=torch.int64),
                "images": images}
    columns = list(zip(*parts))
    mean, label, source = (torch.cat(columns[k]) for k in (0, 2, 3))
    std = torch.cat(columns[1]) if plan.posterior_std else None
    return {"mean": mean, "std": std, "label": label, "source": source, "images": images}
