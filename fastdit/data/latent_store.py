"""The latent store: VAE posteriors of an image folder, in a few large safetensors shards.

Layout of a store folder:

    plan.json                  what is being extracted (VAE, image size, dtype, shard size, file list
                               digest); written first, so a rerun can check it continues the same job
    shard-00000.safetensors    items [0, shard_size) of the sorted file list, and so on:
        mean   (n, 2, C, h, w)  posterior mean of [image, horizontally flipped image], x scale factor
        std    (n, 2, C, h, w)  posterior std, same layout
        label  (n,)             class index
        source (n,)             index of the image in the sorted file list (gaps = skipped images)
    meta.json                  written last, when every shard exists: the plan plus count, shards and
                               skipped files. A store without it is unfinished.

Storing the mean and std of both orientations (rather than one sample) lets training draw a fresh
posterior sample and a fresh flip every time it reads an item (EDM2 does the same), so augmentation
is not frozen at extraction time. Shard i always holds the same images whatever the number of
processes, and is written under a temporary name and renamed, so a killed extraction leaves only whole
shards and the same command continues it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path, atomic_write_json, ensure_writable_dir, is_temporary, remove_stale_temporaries
from ..latents import OFFICIAL_VAES, PIXEL_SPACE_NAMES
from ..run_folder import refuse_other_settings
from .image_folder import ImageFolderIndex, item_generator

FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
META_FILE = "meta.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32"}


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def normalize_vae_name(vae: str) -> str:
    """"ema"/"mse" -> the hub id; a local folder -> its absolute path; anything else unchanged."""
    if vae in PIXEL_SPACE_NAMES:
        return "pixels"  # as `load_latent_space` reads these names
    vae = OFFICIAL_VAES.get(vae, vae)
    return os.path.realpath(vae) if os.path.isdir(vae) else vae


def files_digest(index: ImageFolderIndex) -> str:
    """A fingerprint of the sorted file list and labels: a rerun must see the same images in the same order."""
    digest = hashlib.sha256()
    for path, label in zip(index.files, index.labels):
        digest.update(f"{label}\t{path}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class StorePlan:
    """Everything that decides the content of a store. Shard i holds sources [i * shard_size, ...)."""

    vae: str
    scale_factor: float
    image_size: int
    latent_shape: tuple[int, int, int]  # (C, h, w)
    dtype: str
    shard_size: int
    num_sources: int
    class_names: list[str] = field(default_factory=list)
    files_digest: str = ""

    @property
    def num_shards(self) -> int:
        return -(-self.num_sources // self.shard_size)

    def shard_sources(self, shard: int) -> range:
        """Indices into the sorted file list that shard `shard` holds (before skipping corrupt images)."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_sources))

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self), "latent_shape": list(self.latent_shape)}

    @classmethod
    def from_json(cls, obj: dict) -> "StorePlan":
        names = cls.__dataclass_fields__
        plan = {key: value for key, value in obj.items() if key in names}
        return cls(**{**plan, "latent_shape": tuple(obj["latent_shape"])})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {str(path)!r} ({err}); the latent store is damaged: extract it again") from None


# ----------------------------------------------------------------------------------------------------
# Writing


def open_for_writing(folder: str | os.PathLike, plan: StorePlan, *, is_main: bool = True) -> list[int]:
    """Start or continue a store; returns the shards still to write.

    The main process writes plan.json (or checks it against an earlier run) and removes temporary files
    a killed run left behind; call it there first, then on the other processes after a barrier.
    """
    folder = Path(folder)
    plan_path = folder / PLAN_FILE
    if is_main:
        ensure_writable_dir(folder)
        if plan_path.exists():
            _check_same_plan(folder, StorePlan.from_json(_read_json(plan_path)), plan)
            remove_stale_temporaries(folder)  # left by a killed run; its shard is written again
        elif any(not is_temporary(path) for path in folder.iterdir()):
            raise UserError(
                f"features folder {str(folder)!r} is not empty and holds no latent store ({PLAN_FILE} missing); "
                f"choose a new or empty --features-path"
            )
        else:
            atomic_write_json(plan.to_json(), plan_path)
    elif not plan_path.exists():
        raise UserError(f"{str(plan_path)!r} is missing on this process: is --features-path on a shared filesystem?")
    return [shard for shard in range(plan.num_shards) if not (folder / shard_name(shard)).exists()]


def _check_same_plan(folder: Path, old: StorePlan, new: StorePlan) -> None:
    # Class names can be long lists: compared as one value, named without their contents.
    recorded, requested = asdict(old), asdict(new)
    if recorded.pop("class_names") != requested.pop("class_names"):
        recorded["class names"], requested["class names"] = "as recorded", "different"
    refuse_other_settings(
        f"features folder {str(folder)!r} holds a store started", recorded, requested,
        "rerun with the original settings and images to continue it, or choose a new --features-path",
    )


def write_shard(
    folder: str | os.PathLike,
    shard: int,
    *,
    mean: torch.Tensor,  # (n, 2, C, h, w)
    std: torch.Tensor,  # (n, 2, C, h, w)
    label: torch.Tensor,  # (n,)
    source: torch.Tensor,  # (n,)
    skipped: list[str],
) -> Path:
    """Write one shard atomically: a crash leaves the whole shard or nothing."""
    from safetensors.torch import save_file

    tensors = {
        "mean": mean.contiguous(),
        "std": std.contiguous(),
        "label": label.to(torch.int64).contiguous(),
        "source": source.to(torch.int64).contiguous(),
    }
    path = Path(folder) / shard_name(shard)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"count": str(len(label)), "skipped": json.dumps(skipped)})
    return path


def finalize_store(folder: str | os.PathLike, plan: StorePlan) -> dict:
    """Check every shard against the plan and write meta.json; returns the metadata."""
    folder = Path(folder)
    shards, skipped, count = [], [], 0
    for shard in range(plan.num_shards):
        header = _read_shard_header(folder / shard_name(shard), plan)
        shards.append({"file": shard_name(shard), "count": header["count"]})
        skipped += header["skipped"]
        count += header["count"]
    if count == 0:
        raise UserError(f"every image of the data folder was skipped as corrupt; {str(folder)!r} would be empty")
    meta = {**plan.to_json(), "count": count, "num_classes": len(plan.class_names), "shards": shards}
    meta["skipped"] = skipped
    atomic_write_json(meta, folder / META_FILE)
    return meta


def _read_shard_header(path: Path, plan: StorePlan) -> dict:
    """Shapes, dtypes and counts of one shard, read from its header only (no tensor data)."""
    from safetensors import safe_open

    if not path.exists():
        raise UserError(f"shard {str(path)!r} is missing; rerun the fastdit extract command to write it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
            dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        raise UserError(
            f"shard {str(path)!r} is damaged ({err}); delete it and rerun the fastdit extract command"
        ) from None
    count = int(metadata.get("count", -1))
    expected = [count, 2, *plan.latent_shape]
    expected_shapes = {"mean": expected, "std": expected, "label": [count], "source": [count]}
    problems = [
        f"{key} has shape {shapes.get(key)}, expected {shape}"
        for key, shape in expected_shapes.items()
        if shapes.get(key) != shape
    ]
    problems += [
        f"{key} is {dtypes[key]}, expected {_SAFETENSORS_DTYPES[plan.dtype]}"
        for key in ("mean", "std")
        if key in dtypes and dtypes[key] != _SAFETENSORS_DTYPES[plan.dtype]
    ]
    if count > plan.shard_size:
        problems.append(f"holds {count} items, more than the shard size {plan.shard_size}")
    if problems:
        raise UserError(
            f"shard {str(path)!r} does not match the store: {'; '.join(problems)}; delete it and extract again"
        )
    return {"count": count, "skipped": json.loads(metadata.get("skipped", "[]"))}


# ----------------------------------------------------------------------------------------------------
# Reading


class LatentStore:
    """A finished store, checked on opening (counts and shapes from the shard headers).

    Tensors are read lazily, item by item, through memory-mapped `safe_open` handles, so an
    ImageNet-size store does not have to fit in RAM. Only the labels are loaded up front.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_file():
            raise UserError(f"latent store {str(self.path)!r} is a file; pass the folder `fastdit extract` wrote")
        if not self.path.is_dir():
            raise UserError(f"latent store {str(self.path)!r} does not exist; create it with `fastdit extract`")
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            if (self.path / PLAN_FILE).exists():
                raise UserError(
                    f"latent store {str(self.path)!r} is unfinished ({META_FILE} missing); rerun the same "
                    f"fastdit extract command to finish it"
                )
            raise UserError(
                f"{str(self.path)!r} is not a latent store ({META_FILE} missing); create one with `fastdit extract`, "
                f"or pass a folder of images as --data-path"
            )
        self.meta = _read_json(meta_path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"latent store {str(self.path)!r} has format version {self.meta.get('format_version')!r}; this fastdit "
                f"reads version {FORMAT_VERSION}: extract it again"
            )
        self.plan = StorePlan.from_json(self.meta)
        self._validate()
        self._offsets = [0]  # item i lives in shard k where offsets[k] <= i < offsets[k + 1]
        for shard in self.meta["shards"]:
            self._offsets.append(self._offsets[-1] + shard["count"])
        self._handles: dict[int, object] = {}
        self.labels = torch.cat([self._handle(k).get_tensor("label") for k in range(len(self.meta["shards"]))])

    def _validate(self) -> None:
        shards = self.meta.get("shards", [])
        if len(shards) != self.plan.num_shards:
            raise UserError(
                f"latent store {str(self.path)!r} lists {len(shards)} shards, expected {self.plan.num_shards}; "
                f"extract it again"
            )
        total = 0
        for k, shard in enumerate(shards):
            header = _read_shard_header(self.path / shard_name(k), self.plan)
            if header["count"] != shard["count"]:
                raise UserError(
                    f"shard {shard_name(k)!r} in {str(self.path)!r} holds {header['count']} items but {META_FILE} says "
                    f"{shard['count']}; extract the store again"
                )
            total += header["count"]
        if total != self.meta["count"]:
            raise UserError(
                f"latent store {str(self.path)!r} holds {total} items but {META_FILE} says {self.meta['count']}; "
                f"extract it again"
            )

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])

    def __len__(self) -> int:
        return self.meta["count"]

    def check_compatible(self, *, vae: str | None = None, image_size: int | None = None) -> None:
        """Raise a UserError when the store was made with another VAE or image size than the run asks for."""
        if vae is not None and normalize_vae_name(vae) != self.meta["vae"]:
            raise UserError(
                f"latent store {str(self.path)!r} was made with VAE {self.meta['vae']!r}, but this run uses "
                f"{normalize_vae_name(vae)!r}; pass --vae {self.meta['vae']} or extract the images again with this VAE"
            )
        if image_size is not None and image_size != self.meta["image_size"]:
            raise UserError(
                f"latent store {str(self.path)!r} holds {self.meta['image_size']}px images, but this run asks for "
                f"{image_size}px; pass --image-size {self.meta['image_size']} or extract again at {image_size}px"
            )

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard_name(shard)), framework="pt")
        return self._handles[shard]

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Item i: (mean (2, C, h, w), std (2, C, h, w), label), in the store's dtype."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} is out of range for a store of {len(self)}")
        shard = bisect.bisect_right(self._offsets, i) - 1
        j = i - self._offsets[shard]
        handle = self._handle(shard)
        return handle.get_slice("mean")[j : j + 1][0], handle.get_slice("std")[j : j + 1][0], int(self.labels[i])

    def __getstate__(self) -> dict:
        # Open handles are per process: DataLoader workers reopen the shards they read.
        return {**self.__dict__, "_handles": {}}


class LatentStoreDataset(torch.utils.data.Dataset):
    """Training items from a latent store: item i is (latent (C, h, w) float32, label).

    latent = mean[flip] + std[flip] * noise, where the flip (probability 1/2 when `flip=True`) and the
    Gaussian noise come from `item_generator(seed, epoch, i)`. Call `set_epoch(epoch)` each epoch: the
    same (seed, epoch, i) always gives the same latent, whatever the number of workers or processes,
    so training can be bit-reproducible while augmentation stays fresh every epoch.
    `sample_posterior=False` returns the posterior mean (no noise).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        seed: int = 0,
        flip: bool = True,
        sample_posterior: bool = True,
        vae: str | None = None,
        image_size: int | None = None,
    ):
        self.store = LatentStore(path)
        self.store.check_compatible(vae=vae, image_size=image_size)
        self.seed = seed
        self.flip = flip
        self.sample_posterior = sample_posterior
        self.epoch = 0

    @property
    def class_names(self) -> list[str]:
        return self.store.class_names

    @property
    def num_classes(self) -> int:
        return len(self.store.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.store.latent_shape

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        mean, std, label = self.store.read(i)
        generator = item_generator(self.seed, self.epoch, i)
        side = int(torch.randint(2, (), generator=generator)) if self.flip else 0
        latent = mean[side].float()
        if self.sample_posterior:
            latent = latent + std[side].float() * torch.randn(latent.shape, generator=generator)
        return latent, label
