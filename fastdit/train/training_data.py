"""What the loop trains on: a dataset of model inputs (or of images to encode on the fly), their
shape, and which latent space they live in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model_info import LatentInfo
from ..data import LatentStoreDataset, open_dataset
from ..errors import UserError
from ..latents import check_latent_channels, is_rae_name, latent_side, load_latent_space
from .config import TrainConfig
from .extensions import enabled_extensions


@dataclass
class TrainingData:
    dataset: torch.utils.data.Dataset
    latent_shape: tuple[int, int, int]  # (C, h, w) of the model input
    latent_info: LatentInfo
    class_names: list[str] | None
    encode_on_the_fly: bool = False
    latent_space: object = None  # the VAE, when images are encoded during training
    device: torch.device | None = None

    def decoder(self):
        """The latent space to decode samples with (loaded on first use: stores need no VAE to train)."""
        if self.latent_space is None:
            name = None if self.latent_info.kind == "pixels" else self.latent_info.vae
            self.latent_space = load_latent_space(name, channels=self.latent_shape[0], device=self.device)
            if name is not None:
                check_latent_channels(self.latent_space, self.latent_shape[0], what="the latent store")
        return self.latent_space


def resolve_class_count(config: TrainConfig, data: TrainingData) -> None:
    """The model's class count from the data when --num-classes was not given (set in `config`, which is
    then recorded with it); a given count must be the data's: a larger one would train a label table
    with classes that never occur (and a sampling command would draw them), a smaller one would drop
    labels the data has."""
    found = len(data.class_names) if data.class_names is not None else None
    given = config.model.num_classes
    if given is None:
        if found is None:
            raise UserError("the data does not say how many classes it has; pass --num-classes")
        config.model.num_classes = found
    elif found is not None and given != found:
        raise UserError(f"the data has {found} classes but --num-classes is {given}; leave --num-classes out (it is "
                        f"read from the data) or pass {found}")


def model_input_shape(config: TrainConfig) -> tuple[int, int, int]:
    """(C, H, W) of the model's input for `config`, without loading a VAE or reading the images: a latent
    store's recorded shape, the digits' 1 x 8 x 8, an image folder's 3 x S x S in pixel space, else the SD
    VAE's 4 x S/8 x S/8 (for estimates: `fastdit train --dry-run`)."""
    data, size = config.data, config.model.image_size
    if data.features_path:
        from ..data.latent_store import LatentStore

        return tuple(LatentStore(data.features_path).latent_shape)
    if data.data_path == "digits" and not is_rae_name(data.vae):
        return (1, 8, 8)
    if data.pixel_space:
        return (3, size, size)
    if is_rae_name(data.vae):
        from ..rae.space import describe

        return describe(data.vae).latent_shape
    return (4, latent_side(size), latent_side(size))


def open_training_data(config: TrainConfig, device: torch.device) -> TrainingData:
    data_config, image_size, seed = config.data, config.model.image_size, config.optimisation.global_seed
    source = data_config.source
    # The folders this run writes into: left out of an image folder's listing, and refused where they
    # would change it (`fastdit.data.image_folder.check_outputs_outside_data`).
    outputs = {config.run.results_dir: "--results-dir", str(config.run_dir()): "run folder (--run-name)"}
    if data_config.features_path:
        # Opened as a store whatever the folder holds, so that a wrong path is reported as a wrong store.
        # An extension's encoder (REPA's) must see the image each latent was encoded from: the store keeps
        # it (flipped with the latent) when extracted with --with-images, and is refused otherwise.
        with_images = any(extension.needs_images for extension in enabled_extensions(config))
        dataset = LatentStoreDataset(source, seed=seed, vae=data_config.vae, image_size=image_size,
                                     with_images=with_images)
        info = LatentInfo.of_store(dataset.store.meta)  # SD-VAE or RAE latents, or pixels (`extract --vae pixels`)
        data = TrainingData(dataset, tuple(dataset.store.latent_shape), info, list(dataset.class_names), device=device)
    elif data_config.pixel_space:
        dataset = open_dataset(source, image_size=image_size, seed=seed, exclude=outputs)
        shape = tuple(dataset.sample_shape)
        data = TrainingData(dataset, shape, LatentInfo(kind="pixels", vae=None, scale_factor=1.0),
                            list(dataset.class_names), device=device)
    else:
        digits = source == "digits"
        if digits and not is_rae_name(data_config.vae):
            raise UserError("the digits are 8x8 pixels: train them in pixel space (--vae pixels), or in an RAE space "
                            "made for them (rae:FOLDER of a `fastdit train-decoder --data-path digits` run)")
        dataset = open_dataset(source, image_size=image_size, seed=seed, exclude=outputs)
        vae_name = data_config.vae or "ema"
        latent_space = load_latent_space(vae_name, channels=3, device=device)  # image folders are read as RGB
        if digits and latent_space.image_channels != 1:
            raise UserError(f"the digits are gray images but {vae_name!r} encodes RGB ones; use an RAE space made "
                            "for the digits (rae:FOLDER of a `fastdit train-decoder --data-path digits` run)")
        size = latent_space.latent_size(image_size)
        info = LatentInfo.of_space(latent_space)
        data = TrainingData(dataset, (latent_space.channels, size, size), info, list(dataset.class_names),
                            encode_on_the_fly=True, latent_space=latent_space, device=device)
    resolve_class_count(config, data)
    expected = image_size // data.latent_info.downsample
    if data.latent_shape[1] != expected:
        raise UserError(
            f"the data's samples are {data.latent_shape[1]}x{data.latent_shape[2]} model inputs, but --image-size "
            f"{image_size} needs {expected}x{expected}; pass the image size the data was made at"
        )
    return data
