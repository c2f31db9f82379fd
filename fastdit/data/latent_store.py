"""The latent store: VAE posteriors (or RAE latents) of an image folder, in a few large safetensors shards.

Layout of a store folder:

    plan.json                  what is being extracted (VAE, image size, dtype, shard size, file list
                               digest); written first, so a rerun can check it continues the same job
    shard-00000.safetensors    items [0, shard_size) of the sorted file list, and so on:
        mean   (n, 2, C, h, w)  posterior mean of [image, horizontally flipped image], x scale factor
        std    (n, 2, C, h, w)  posterior std, same layout; absent in a store of a deterministic space
                                (an RAE's encoder tokens: plan key "posterior_std": false), whose latent
                                is the mean itself
        label  (n,)             class index
        source (n,)             index of the image in the sorted file list (gaps = skipped images)
      and, in a store extracted with --with-images (plan key "with_images": true):
        image_png     (bytes,)  uint8: the PNG files of the n crops, one after the other
        image_offsets (n + 1,)  int64: crop j is image_png[offsets[j] : offsets[j + 1]]
    meta.json                  written last, when every shard exists: the plan plus count, shards,
                               skipped files and the data folder. A store without it is unfinished.

Storing the mean and std of both orientations (rather than one sample) lets training draw a fresh
posterior sample and a fresh flip every time it reads an item (EDM2 does the same), so augmentation
is not frozen at extraction time. Shard i always holds the same images whatever the number of
processes, and is written under a temporary name and renamed, so a killed extraction leaves only whole
shards and the same command continues it.

Size. A store holds 2 (flips) x C x h x w values per image, twice with the std: 4 x 32 x 32 x 2 x 2 at
256 px with the SD VAE (32 kB in float16), but 768 x 16 x 16 x 2 with RAE's DINOv2-B tokens (786 kB in
float16, 1.01 TB for ImageNet's 1.28M training images; twice that in float32). float16 is the default
and suits RAE latents best of what the store holds: they have unit variance per element, where float16's
relative rounding (2^-11) is far below the noise the diffusion model is trained with; they cannot
overflow it (the encoder's final LayerNorm bounds each token element by sqrt(C - 1) < 28, and eps = 1e-5
bounds the normalisation, so |z| < 56 / sqrt(1e-5) < 18,000 < 65,504); bfloat16 would round 8x more
coarsely for range that is not needed. `fastdit extract` says how much it will write and refuses to
start without the space.

The crops (the exact RGB image the VAE encoded, unflipped: the flip is `crop.flip(-1)`, as extraction
makes it) live in the shard of their latents rather than in shards of their own, so one rename still
publishes a whole shard: a shard is never missing its images, resume needs no second bookkeeping, and
an image can never be paired with a latent of another run. Reading stays fast because safetensors
reads by byte range through a memory map: latent-only training never touches the image bytes, and an
item's image is one slice of `image_png`. PNG, not JPEG, because a representation encoder must see the
very pixels whose latent is trained; at compression level 1 rather than Pillow's default 6, which makes
files only a little smaller but encodes several times slower, in the decoding workers that must keep up
with the VAE.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io import (
    atomic_path,
    atomic_write_json,
    check_regular_file,
    ensure_writable_dir,
    is_temporary,
    remove_stale_temporaries,
)
from ..latents import OFFICIAL_VAES, PIXEL_SPACE_NAMES, is_rae_name
from ..run_folder import refuse_other_settings
from .image_folder import ImageFolderIndex, item_generator, pixels_to_unit_range

FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
META_FILE = "meta.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32"}
IMAGE_BYTES = "image_png"
IMAGE_OFFSETS = "image_offsets"
PNG_COMPRESS_LEVEL = 1  # why 1: the module docstring
# The defaults of `fastdit extract`'s plan settings; the command line a store prints leaves them out.
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_DTYPE = "float16"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def normalize_vae_name(vae: str) -> str:
    """"ema"/"mse" -> the hub id; a local folder -> its absolute path; anything else unchanged."""
    if vae in PIXEL_SPACE_NAMES:
        return "pixels"  # as `load_latent_space` reads these names
    if is_rae_name(vae):  # "rae:<variant>" unchanged, "rae:FOLDER" with the folder's absolute path
        folder = os.path.expanduser(vae[len("rae:"):])
        return "rae:" + os.path.realpath(folder) if os.path.isdir(folder) else vae
    vae = OFFICIAL_VAES.get(vae, vae)
    return os.path.realpath(vae) if os.path.isdir(vae) else vae


def files_digest(index: ImageFolderIndex) -> str:
    """A fingerprint of the sorted file list and labels: a rerun must see the same images in the same order."""
    digest = hashlib.sha256()
    for path, label in zip(index.files, index.labels):
        # surrogateescape: a file name that is not UTF-8 (Python holds its bytes as surrogates) hashes as its bytes
        digest.update(f"{label}\t{path}\n".encode("utf-8", "surrogateescape"))
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
    # Plans written before images could be stored have no such key and read as False.
    with_images: bool = False
    # False for a deterministic space (an RAE's encoder): the shards hold no std. Older plans: True.
    posterior_std: bool = True

    @property
    def num_shards(self) -> int:
        return -(-self.num_sources // self.shard_size)

    def item_bytes(self) -> int:
        """Bytes of one item's tensors (crops left out): the latents of the image and its flip, their std
        where stored, the label and the source index."""
        values = 2 * int(np.prod(self.latent_shape)) * (2 if self.posterior_std else 1)
        return values * DTYPES[self.dtype].itemsize + 2 * 8

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
    check_regular_file(path, "latent store record")
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
    Asking for images on a store extracted without them is allowed: every shard without images is
    encoded again, so each crop and its latents come from one decode of the file (adding crops to the
    old latents would pair them wrongly had a file changed since).
    """
    folder = Path(folder)
    plan_path = folder / PLAN_FILE
    if is_main:
        ensure_writable_dir(folder)
        if plan_path.exists():
            recorded = StorePlan.from_json(_read_json(plan_path))
            if plan.with_images and not recorded.with_images:
                _check_same_plan(folder, replace(recorded, with_images=True), plan)
                # meta.json goes first: until every shard holds images the store is unfinished, and a
                # kill between the two steps leaves an unfinished store that either command finishes.
                (folder / META_FILE).unlink(missing_ok=True)
                atomic_write_json(plan.to_json(), plan_path)
            else:
                _check_same_plan(folder, recorded, plan)
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
    return [shard for shard in range(plan.num_shards) if not _shard_is_written(folder / shard_name(shard), plan)]


def _shard_is_written(path: Path, plan: StorePlan) -> bool:
    if not path.exists():
        return False
    check_regular_file(path, "shard")
    if not plan.with_images:
        return True
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return IMAGE_BYTES in handle.keys()
    except Exception:  # noqa: BLE001 - a damaged shard: written again rather than refused at the end
        return False


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
    std: torch.Tensor | None,  # (n, 2, C, h, w); None in a store without posterior std
    label: torch.Tensor,  # (n,)
    source: torch.Tensor,  # (n,)
    skipped: list[str],
    images: list[bytes] | None = None,  # n PNG files (`encode_png`), for a store with images
) -> Path:
    """Write one shard atomically: a crash leaves the whole shard or nothing."""
    from safetensors.torch import save_file

    tensors = {
        "mean": mean.contiguous(),
        **({"std": std.contiguous()} if std is not None else {}),
        "label": label.to(torch.int64).contiguous(),
        "source": source.to(torch.int64).contiguous(),
    }
    if images is not None:
        if len(images) != len(label):
            raise ValueError(f"{len(images)} images for {len(label)} items")
        tensors[IMAGE_OFFSETS] = torch.tensor([0, *itertools.accumulate(map(len, images))], dtype=torch.int64)
        # numpy, not torch.frombuffer: an empty shard has no bytes, which torch.frombuffer refuses.
        tensors[IMAGE_BYTES] = torch.from_numpy(np.frombuffer(b"".join(images), dtype=np.uint8).copy())
    path = Path(folder) / shard_name(shard)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"count": str(len(label)), "skipped": json.dumps(skipped)})
    return path


def encode_png(pixels: torch.Tensor) -> bytes:
    """(3, H, W) uint8 RGB -> the bytes of a PNG file (lossless: decoding gives the same pixels back)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


class DamagedCropError(UserError):
    """A stored crop that does not decode to the (3, S, S) RGB pixels of its store."""


def decode_png(data: bytes, side: int | None = None) -> torch.Tensor:
    """The bytes of a PNG file -> (3, H, W) uint8 RGB; a `DamagedCropError` for bytes that are no PNG, or
    whose image is not `side` x `side` RGB when `side` is given."""
    import zlib

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "RGB":
                raise DamagedCropError(f"a {image.mode} image, not RGB")
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError, zlib.error, Image.DecompressionBombError) as err:
        raise DamagedCropError(f"not a readable PNG ({type(err).__name__}: {err})") from None
    if side is not None and pixels.shape != (3, side, side):
        raise DamagedCropError(f"{pixels.shape[2]}x{pixels.shape[1]} pixels, not {side}x{side}")
    return pixels


# What every stored crop starts and ends with (`encode_png` of (3, S, S) uint8 RGB): the PNG signature,
# the IHDR chunk (length 13, width, height, bit depth 8, colour type 2 = RGB), and the IEND chunk.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_HEAD = len(_PNG_SIGNATURE) + 10  # + width, height, bit depth, colour type


def damaged_crops(path: Path, image_size: int) -> list[tuple[int, str]]:
    """(item in the shard, what is wrong) of each crop of a shard with images that is not a whole PNG of
    image_size x image_size RGB pixels, read from the offsets, each crop's first 28 and last 12 bytes
    (a memory map: a few pages per crop, never the pixel data), so that a store can be checked when it is
    opened. A crop cut or overwritten in its middle is found by decoding it (`verify_store`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        offsets = handle.get_slice(IMAGE_OFFSETS)[:].numpy()
    data = _tensor_bytes(path, IMAGE_BYTES)
    problems = []
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
        return [(0, f"its {IMAGE_OFFSETS} do not run from 0 to the {len(data)} image bytes")]
    starts, ends = offsets[:-1], offsets[1:]
    short = ends - starts < _PNG_HEAD + len(_PNG_END)
    whole = np.flatnonzero(~short)
    heads = data[starts[whole, None] + np.arange(_PNG_HEAD)] if len(whole) else np.zeros((0, _PNG_HEAD), np.uint8)
    tails = data[ends[whole, None] - len(_PNG_END) + np.arange(len(_PNG_END))] if len(whole) else heads[:, :0]
    signature = np.frombuffer(_PNG_SIGNATURE, np.uint8)
    size = np.frombuffer(int(image_size).to_bytes(4, "big") * 2 + b"\x08\x02", np.uint8)
    end = np.frombuffer(_PNG_END, np.uint8)
    for item in np.flatnonzero(short):
        problems.append((int(item), f"{int(ends[item] - starts[item])} bytes, too short for a PNG"))
    for row, item in enumerate(whole):
        head = heads[row]
        if not np.array_equal(head[: len(signature)], signature):
            problems.append((int(item), "not a PNG"))
        elif not np.array_equal(head[len(signature):], size):
            width, height = (int.from_bytes(head[i: i + 4].tobytes(), "big") for i in (16, 20))
            problems.append((int(item), f"{width}x{height} pixels (bit depth {head[24]}, colour type {head[25]}), "
                                        f"not {image_size}x{image_size} 8-bit RGB"))
        elif not np.array_equal(tails[row], end):
            problems.append((int(item), "cut short (no PNG end)"))
    return sorted(problems)


def _tensor_bytes(path: Path, key: str) -> np.ndarray:
    """A memory map of tensor `key`'s bytes in a safetensors file (header: an 8-byte length, then JSON
    whose entries give each tensor's byte range after it)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    begin, end = header[key]["data_offsets"]
    if end == begin:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length + begin, shape=(end - begin,))


def size_on_disk(folder: str | os.PathLike) -> int:
    """Bytes of the store's files (shards and JSON), leaving out temporaries of a running writer."""
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file() and not is_temporary(path))


def format_size(num_bytes: int) -> str:
    """1234567 -> "1.23 MB" (decimal units, as disks are sold and `df -H` shows them)."""
    value, unit = num_bytes, "bytes"
    for larger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, larger
    return f"{value} bytes" if unit == "bytes" else f"{value:.2f} {unit}"


def finalize_store(folder: str | os.PathLike, plan: StorePlan, *, data_path: str | os.PathLike | None = None) -> dict:
    """Check every shard against the plan and write meta.json; returns the metadata.

    `data_path`, the image folder, is recorded so that a message can give the command that extracts
    this store again (e.g. with images)."""
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
    if data_path is not None:
        meta["data_path"] = os.path.abspath(data_path)
    atomic_write_json(meta, folder / META_FILE)
    return meta


def _read_shard_header(path: Path, plan: StorePlan) -> dict:
    """Shapes, dtypes and counts of one shard, read from its header only (no tensor data)."""
    from safetensors import safe_open

    if not path.exists():
        raise UserError(f"shard {str(path)!r} is missing; rerun the fastdit extract command to write it")
    check_regular_file(path, "shard")
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
    moments = ("mean", "std") if plan.posterior_std else ("mean",)
    expected_shapes = {**{key: expected for key in moments}, "label": [count], "source": [count]}
    problems = [
        f"{key} has shape {shapes.get(key)}, expected {shape}"
        for key, shape in expected_shapes.items()
        if shapes.get(key) != shape
    ]
    problems += [
        f"{key} is {dtypes[key]}, expected {_SAFETENSORS_DTYPES[plan.dtype]}"
        for key in moments
        if key in dtypes and dtypes[key] != _SAFETENSORS_DTYPES[plan.dtype]
    ]
    if plan.with_images:
        if IMAGE_BYTES not in shapes or IMAGE_OFFSETS not in shapes:
            problems.append(f"holds no images ({IMAGE_BYTES} or {IMAGE_OFFSETS} missing)")
        elif shapes[IMAGE_OFFSETS] != [count + 1] or len(shapes[IMAGE_BYTES]) != 1 or dtypes[IMAGE_BYTES] != "U8":
            problems.append(
                f"{IMAGE_OFFSETS} has shape {shapes[IMAGE_OFFSETS]}, expected {[count + 1]}, and {IMAGE_BYTES} "
                f"is {dtypes[IMAGE_BYTES]} of shape {shapes[IMAGE_BYTES]}, expected U8 of one dimension"
            )
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
        self._check_labels()

    def _check_labels(self) -> None:
        """Every label indexes a recorded class: an embedding lookup past the table would fail in the
        middle of training (or, on a GPU, as an unreadable device-side assertion)."""
        num_classes = len(self.meta.get("class_names", []))
        bad = (self.labels < 0) | (self.labels >= num_classes)
        if bad.any():
            first = int(bad.nonzero()[0, 0])
            raise UserError(
                f"latent store {str(self.path)!r} holds {int(bad.sum())} label(s) outside its {num_classes} classes "
                f"(item {first} has label {int(self.labels[first])}, classes are 0..{num_classes - 1}); the store is "
                f"damaged or was edited: extract it again"
            )

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

    @property
    def has_images(self) -> bool:
        """True for a store extracted with --with-images (`read_image` works)."""
        return bool(self.meta.get("with_images", False))

    def extract_command(self, *, with_images: bool) -> str:
        """The `fastdit extract` command line of this store's recorded settings (so that it continues this
        store rather than being refused), with --with-images if asked."""
        vae = {repo: name for name, repo in OFFICIAL_VAES.items()}.get(self.meta["vae"], self.meta["vae"])
        data_path = self.meta.get("data_path")  # stores written before it was recorded lack it
        argv = ["fastdit", "extract", "--data-path", shlex.quote(data_path) if data_path else "<the image folder>",
                "--features-path", shlex.quote(str(self.path)), "--image-size", str(self.plan.image_size),
                "--vae", shlex.quote(vae)]
        # The plan must match for the command to continue this store; flags at their defaults are left out.
        if self.plan.shard_size != DEFAULT_SHARD_SIZE:
            argv += ["--shard-size", str(self.plan.shard_size)]
        if self.plan.dtype != DEFAULT_DTYPE:
            argv += ["--dtype", self.plan.dtype]
        return " ".join(argv + ["--with-images"] * with_images)

    def require_images(self) -> None:
        """Raise a UserError, giving the command that adds them, unless the store holds images."""
        if not self.has_images:
            raise UserError(
                f"latent store {str(self.path)!r} holds no images (it was extracted without --with-images); add "
                f"them with `{self.extract_command(with_images=True)}`, which encodes the store again with each "
                f"image beside its latents"
            )

    def check_images(self) -> None:
        """Raise a UserError naming the damaged crops (`damaged_crops`: cut, overwritten, of another size)
        and the command that encodes their shards again; before training rather than at some step."""
        self.require_images()
        damaged = {}
        for k in range(len(self.meta["shards"])):
            problems = damaged_crops(self.path / shard_name(k), self.plan.image_size)
            if problems:
                damaged[k] = problems
        if damaged:
            raise UserError(self._damaged_message(damaged))

    def _damaged_message(self, damaged: dict[int, list[tuple[int, str]]]) -> str:
        count = sum(map(len, damaged.values()))
        shard, problems = next(iter(damaged.items()))
        item, problem = sorted(problems)[0]
        names = " ".join(shard_name(k) for k in damaged)
        return (f"latent store {str(self.path)!r} holds {count} damaged item(s) (item {self._offsets[shard] + item}, "
                f"in {shard_name(shard)}: {problem}); delete {names} and rerun "
                f"`{self.extract_command(with_images=self.has_images)}` to encode them again from the images")

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard_name(shard)), framework="pt")
        return self._handles[shard]

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, position in the shard) of item i."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} is out of range for a store of {len(self)}")
        shard = bisect.bisect_right(self._offsets, i) - 1
        return shard, i - self._offsets[shard]

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Item i: (mean (2, C, h, w), std (2, C, h, w) or None where the store holds none, label), in the
        store's dtype."""
        shard, j = self._locate(i)
        handle = self._handle(shard)
        std = handle.get_slice("std")[j : j + 1][0] if self.plan.posterior_std else None
        return handle.get_slice("mean")[j : j + 1][0], std, int(self.labels[i])

    def read_image(self, i: int) -> torch.Tensor:
        """Item i's crop, unflipped: (3, S, S) uint8 RGB, the exact pixels the VAE encoded as mean[0]."""
        self.require_images()
        shard, j = self._locate(i)
        handle = self._handle(shard)
        start, end = handle.get_slice(IMAGE_OFFSETS)[j : j + 2].tolist()
        try:
            return decode_png(handle.get_slice(IMAGE_BYTES)[start:end].numpy().tobytes(), self.plan.image_size)
        except DamagedCropError as err:
            raise DamagedCropError(self._damaged_message({shard: [(j, str(err))]})) from None

    def __getstate__(self) -> dict:
        # Open handles are per process: DataLoader workers reopen the shards they read.
        return {**self.__dict__, "_handles": {}}


def verify_store(path: str | os.PathLike, progress: bool = True) -> int:
    """Read every item of a finished store whole: finite posterior moments, and, in a store with images,
    each crop decoded to its (3, S, S) RGB pixels; returns the number of items. A UserError names the
    damaged items and the shards to encode again (`fastdit extract --verify`)."""
    from tqdm import tqdm

    store = LatentStore(path)
    damaged: dict[int, list[tuple[int, str]]] = {}
    bar = tqdm(total=len(store), unit="item", desc="verify", disable=not progress, dynamic_ncols=True)
    for k, shard in enumerate(store.meta["shards"]):
        handle = store._handle(k)
        for key in ("mean", "std") if store.plan.posterior_std else ("mean",):
            values = handle.get_tensor(key)
            bad = (~torch.isfinite(values)).flatten(1).any(dim=1)
            damaged.setdefault(k, []).extend((int(j), f"non-finite {key}") for j in bad.nonzero()[:, 0])
        if store.has_images:
            offsets = handle.get_tensor(IMAGE_OFFSETS).tolist()
            data = handle.get_slice(IMAGE_BYTES)
            for j in range(shard["count"]):
                try:
                    decode_png(data[offsets[j]: offsets[j + 1]].numpy().tobytes(), store.plan.image_size)
                except DamagedCropError as err:
                    damaged[k].append((j, str(err)))
                bar.update(1)
        else:
            bar.update(shard["count"])
        if not damaged[k]:
            del damaged[k]
    bar.close()
    if damaged:
        raise UserError(store._damaged_message(damaged))
    return len(store)


class LatentStoreDataset(torch.utils.data.Dataset):
    """Training items from a latent store: item i is (latent (C, h, w) float32, label), or with
    `with_images=True` (latent, label, image (3, S, S) float32 in [-1, 1]).

    latent = mean[flip] + std[flip] * noise, where the flip (probability 1/2 when `flip=True`) and the
    Gaussian noise come from `item_generator(seed, epoch, i)`; mean[flip] in a store without std (RAE). Call `set_epoch(epoch)` each epoch: the
    same (seed, epoch, i) always gives the same latent, whatever the number of workers or processes,
    so training can be bit-reproducible while augmentation stays fresh every epoch.
    `sample_posterior=False` returns the posterior mean (no noise).

    The image is the crop the VAE encoded, mirrored exactly when the latent is the mirrored one (the
    same draw decides both), so an encoder that sees it (REPA) sees the image whose latent is trained.
    It costs no random draw: the latents are the same with or without it. `with_images=True` needs a
    store extracted with `--with-images`; on another store it raises a UserError giving that command.
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
        with_images: bool = False,
    ):
        self.store = LatentStore(path)
        self.store.check_compatible(vae=vae, image_size=image_size)
        if with_images:
            self.store.check_images()
        self.with_images = with_images
        self.replaced: set[int] = set()  # items whose crop failed to decode, read in this process
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        if not self.with_images:
            return self._item(i)
        # A crop damaged past what opening checks (its middle overwritten) is skipped as extraction's
        # --skip-corrupt would have: the next item whose crop reads stands in for it, and it is counted and
        # named once per process, so that training goes on and the store can be mended after.
        for offset in range(len(self)):
            j = (i + offset) % len(self)
            try:
                return self._item(j)
            except DamagedCropError as err:
                if j not in self.replaced:
                    self.replaced.add(j)
                    print(f"warning: {err}; {len(self.replaced)} item(s) skipped so far, each replaced by the next",
                          file=sys.stderr, flush=True)
        raise UserError(f"no crop of latent store {str(self.store.path)!r} can be read; extract it again")

    def _item(self, i: int):
        mean, std, label = self.store.read(i)
        generator = item_generator(self.seed, self.epoch, i)
        side = int(torch.randint(2, (), generator=generator)) if self.flip else 0  # 1: the mirrored image
        latent = mean[side].float()
        if self.sample_posterior and std is not None:
            latent = latent + std[side].float() * torch.randn(latent.shape, generator=generator)
        if not self.with_images:
            return latent, label
        image = pixels_to_unit_range(self.store.read_image(i))  # (3, S, S), as extraction fed the VAE
        return latent, label, image.flip(-1) if side else image
