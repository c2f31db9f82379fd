"""Issue #28: nothing a user feeds the new methods breaks them. Each class of input is refused with one
line naming the value and the fix (a UserError, which the CLI prints as one line with exit status 2), at
the place it enters, before any expensive work, and nothing on disk is lost or replaced.

The tests are grouped by the issue's classes (1-14); each failed before its fix.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastdit.encoders import FrozenEncoder, load_encoder
from fastdit.errors import UserError

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated"),
]


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# 1. A TorchScript encoder is checked against what it takes and returns before training starts
# ---------------------------------------------------------------------------------------------------------


class Tokens(nn.Module):
    """(N, 3, R, R) -> (N, (R/4)², 8): a 4-px patch embedding."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class GrayOnly(nn.Module):
    """Takes one channel: fails on the RGB images every encoder is fed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(1, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class BatchDependent(nn.Module):
    """Its token count follows the batch size."""

    def __init__(self):
        super().__init__()
        self.inner = Tokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.inner(x)
        return tokens.reshape(1, -1, tokens.shape[-1]).expand(x.shape[0], -1, -1)


class IntegerTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Tokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).long()


class HugeSide(nn.Module):
    """Claims a 100000-px input: the probe would allocate 120 GB of pixels."""

    def __init__(self):
        super().__init__()
        self.resolution = 100_000
        self.inner = Tokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def scripted(module: nn.Module, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module.eval()).save(str(path))
    return str(path)


@pytest.mark.parametrize("module, message", [
    (GrayOnly(), r"fails on a blank batch of shape \(1, 3, 16, 16\) \(RuntimeError: .*\(N, 3, R, R\)"),
    (BatchDependent(), r"returns shape \(2, 32, 8\) for 2 image\(s\)|must not depend on the batch"),
    (IntegerTokens(), r"returns a int64 tensor; an encoder returns floating-point tokens"),
    (HugeSide(), r"attribute `resolution`: encoder resolution 100000 is not an int from 1 to 1024"),
], ids=["one channel", "batch-dependent", "integer tokens", "100000 px"])
def test_a_torchscript_encoder_that_does_not_fit_is_refused_when_loaded(tmp_path, module, message):
    path = scripted(module, tmp_path / "encoder.pt")
    with pytest.raises(UserError, match=message) as info:
        load_encoder(path, resolution=None if isinstance(module, HugeSide) else 16)
    one_line(info)


def test_an_encoder_whose_output_changes_after_loading_is_one_line():
    class Changing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = Tokens(), 0

        def forward(self, x):
            self.calls += 1
            tokens = self.inner(x)
            return tokens if self.calls <= 2 else tokens[:, :4]

    encoder = FrozenEncoder(Changing(), resolution=16, name="changing")
    with pytest.raises(UserError, match=r"returned 4 tokens 8 wide, but 16 8 wide when it was loaded") as info:
        encoder(torch.zeros(2, 3, 16, 16))
    one_line(info)


def test_a_torchscript_path_holding_an_equals_sign_loads(tmp_path):
    torch.manual_seed(0)
    path = scripted(Tokens(), tmp_path / "run=3" / "encoder.pt")
    encoder = load_encoder(path, resolution=16)
    assert (encoder.grid, encoder.dim) == (4, 8)
    # and one whose part before "=" is a registered encoder's name
    named = tmp_path / "dinov2-vitb14=x.pt"
    named.write_bytes(Path(path).read_bytes())
    assert load_encoder(str(named), resolution=16).dim == 8


# ---------------------------------------------------------------------------------------------------------
# 14. Encoder weights in an integer dtype are refused, not cast
# ---------------------------------------------------------------------------------------------------------


def test_integer_encoder_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from tiny_encoders import save_tiny

    folder = save_tiny("dinov2", tmp_path / "dinov2")
    weights = load_file(str(folder / "model.safetensors"))
    key = sorted(k for k in weights if k.endswith("weight"))[0]
    weights[key] = (weights[key] * 100).to(torch.int8)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=rf"holds I8 values in '{key}'.*weights are floating point") as info:
        load_encoder(f"dinov2-vitb14={folder}")
    one_line(info)


# ---------------------------------------------------------------------------------------------------------
# 3. A resumed REPA run refuses an encoder other than the one it was trained against
# ---------------------------------------------------------------------------------------------------------


def digit_encoder(path: Path, seed: int, dim: int = 64) -> str:
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder

    torch.manual_seed(seed)
    return str(save_digit_encoder(DigitTokens(dim), path))


@pytest.mark.parametrize("dim", [64, 32], ids=["same shape, other weights", "another width"])
def test_a_resumed_repa_run_refuses_another_encoder_at_the_same_path(tmp_path, dim):
    from fastdit.train.loop import train
    from test_train import final_state, tiny_config

    path = tmp_path / "encoder.ts"
    fields = dict(repa=digit_encoder(path, seed=1), repa_depth=1, repa_projector_dim=32, ckpt_every=2)
    first = train(tiny_config(tmp_path / "runs", max_steps=2, **fields))
    recorded = final_state(first.run_dir)["alignment"]["encoder"]
    assert recorded["name"] == str(path) and len(recorded["sha256"]) == 64 and recorded["dim"] == 64
    digit_encoder(path, seed=2, dim=dim)  # replaced in place: the same setting, other targets
    with pytest.raises(UserError, match=r"records its REPA encoder with other settings \(.*sha256: \"[0-9a-f]{12}\" "
                                        r"-> \"[0-9a-f]{12}\".*pass the encoder it was trained with") as info:
        train(tiny_config(tmp_path / "runs", max_steps=4, **fields))
    message = one_line(info)
    assert ("dim: 64 -> 32" in message) == (dim == 32)
    assert len(list((first.run_dir / "checkpoints").glob("*.pt"))) == 1  # nothing written, nothing lost


# ---------------------------------------------------------------------------------------------------------
# 7. Unbounded sizes: REPA's projector width
# ---------------------------------------------------------------------------------------------------------


def test_repa_projector_width_is_bounded(tmp_path):
    from test_train import tiny_config

    with pytest.raises(UserError, match="--repa-projector-dim") as info:
        tiny_config(tmp_path, repa="x.ts", repa_projector_dim=10**7).validate()
    one_line(info)


# ---------------------------------------------------------------------------------------------------------
# 4. `fastdit ema` writes no wrong or non-finite weights; 5. it never replaces a file the run owns
# ---------------------------------------------------------------------------------------------------------


def cli_error(argv, capsys) -> str:
    """The one line a command prints on stderr before leaving with status 2."""
    from fastdit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
    """A run with post-hoc EMA snapshots at steps 2, 4 and 6 (σ_rel 0.05 and 0.1)."""
    from fastdit.train.loop import train
    from test_train import tiny_config

    folder = tmp_path_factory.mktemp("posthoc")
    return train(tiny_config(folder, posthoc_ema=True, posthoc_every=2, max_steps=6, ckpt_every=6)).run_dir


@pytest.fixture
def run_copy(posthoc_run, tmp_path):
    import shutil

    return Path(shutil.copytree(posthoc_run, tmp_path / "run"))


def files_of(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def rewrite_snapshot(path: Path, edit_weights=None, edit_record=None, model_info=None):
    """The snapshot at `path` written again with its weights and/or its records edited."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    weights = load_file(str(path))
    if edit_weights:
        edit_weights(weights)
    if edit_record:
        record = json.loads(metadata["posthoc_ema_snapshot"])
        edit_record(record)
        metadata["posthoc_ema_snapshot"] = json.dumps(record)
    if model_info is not None:
        metadata["model_info"] = json.dumps(model_info)
    save_file(weights, str(path), metadata=metadata)


def test_a_nan_snapshot_is_refused_and_nothing_is_written(run_copy, capsys):
    snapshot = run_copy / "posthoc_ema" / "0000004-sigma0.1.safetensors"
    rewrite_snapshot(snapshot, edit_weights=lambda w: w["pos_embed"].view(-1)[0].fill_(float("nan")))
    before = files_of(run_copy)
    message = cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07"], capsys)
    assert f"snapshot {str(snapshot)!r} holds non-finite weights (1 NaN or inf value(s) in 'pos_embed')" in message
    assert "move it out of" in message
    assert files_of(run_copy) == before


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.update(gamma=3.0), "its record's gamma 3.0 is not the γ of σ_rel 0.1"),
    (lambda r: r.update(step="4"), "its record's step '4' is not the step 4 its name gives"),
    (lambda r: r.update(sigma_rel=-1), "its record's sigma_rel -1 is no EMA length"),
], ids=["gamma", "step", "sigma_rel"])
def test_a_snapshot_with_a_malformed_record_is_refused(run_copy, capsys, edit, problem):
    snapshot = run_copy / "posthoc_ema" / "0000004-sigma0.1.safetensors"
    rewrite_snapshot(snapshot, edit_record=edit)
    message = cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07"], capsys)
    assert f"{str(snapshot)!r} is not a post-hoc EMA snapshot fastdit wrote ({problem}); move it out of" in message


def test_a_snapshot_of_another_model_is_refused(run_copy, capsys):
    from fastdit.checkpoint import export_weights
    from fastdit.model_info import LatentInfo, ModelInfo
    from fastdit.models import build_model
    from fastdit.train.posthoc_ema import SNAPSHOT_KEY

    other = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2)
    info = ModelInfo(config=other.config, latent=LatentInfo(kind="pixels", vae=None, scale_factor=1.0))
    snapshot = run_copy / "posthoc_ema" / "0000004-sigma0.1.safetensors"
    from fastdit.power_ema import gamma_of_sigma_rel

    export_weights(other, info, snapshot, extra={SNAPSHOT_KEY: {"step": 4, "sigma_rel": 0.1,
                                                                 "gamma": gamma_of_sigma_rel(0.1)}})
    message = cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07"], capsys)
    assert f"snapshot {str(snapshot)!r} holds another model than" in message and "mixes runs" in message
    # weights that do not fit their own record
    rewrite_snapshot(snapshot, model_info=json.loads(json.dumps(
        {**info.to_dict(), "model": {**info.to_dict()["model"], "hidden_size": 64}})))
    message = cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07"], capsys)
    assert "does not fit this model" in message


def test_a_poor_fit_is_refused_unless_asked_for(run_copy, capsys):
    from fastdit.cli import main

    before = files_of(run_copy)
    message = cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.05", "--step", "3"], capsys)
    assert "only with a 96.8% profile error (above --max-fit-error 0.1), so the export would not be that EMA" in message
    assert "nearest: 2" in message and "--max-fit-error 0.977" in message
    assert files_of(run_copy) == before
    assert main(["ema", "--run", str(run_copy), "--sigma-rel", "0.05", "--step", "3", "--max-fit-error", "1"]) == 0
    assert (run_copy / "checkpoints" / "0000003-ema-sigma0.05.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--posthoc-sigma-rels", "1e-300", "0.1"], "--posthoc-sigma-rels must be in [0.001, 0.300]"),
    (["--posthoc-sigma-rels", "0.0001", "0.1"], "--posthoc-sigma-rels must be in [0.001, 0.300]"),
], ids=["1e-300", "1e-4"])
def test_tracked_lengths_that_underflow_are_refused_where_they_are_set(tmp_path, capsys, flags, message):
    from test_train import TINY

    line = cli_error(["train", *TINY, "--posthoc-ema", "--results-dir", tmp_path / "runs", "--max-steps", "1", *flags],
                     capsys)
    assert message in line and "shorter profiles underflow float64" in line
    assert not (tmp_path / "runs").exists()


def test_ema_out_never_replaces_a_file_of_the_run(run_copy, capsys):
    from fastdit.cli import main

    before = files_of(run_copy)
    other = run_copy.parent / "notes.safetensors"
    other.write_bytes(b"mine")
    for out, message in (
        (run_copy / "posthoc_ema" / "0000002-sigma0.05.safetensors", "is in the run's snapshot folder"),
        (run_copy / "posthoc_ema" / "0000009-sigma0.2.safetensors", "is in the run's snapshot folder"),
        (run_copy / "checkpoints" / "0000006-ema.safetensors", "is a name the run gives its own checkpoints"),
        (run_copy / "checkpoints" / "0000008-ema.safetensors", "is a name the run gives its own checkpoints"),
        (other, "exists and is not an earlier `fastdit ema` export"),
    ):
        assert message in cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07", "--out", out], capsys)
    link = run_copy / "link.safetensors"
    link.symlink_to(run_copy / "posthoc_ema" / "0000006-sigma0.1.safetensors")
    assert "snapshot folder" in cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07", "--out", link], capsys)
    link.unlink()
    assert files_of(run_copy) == before and other.read_bytes() == b"mine"
    # An earlier `fastdit ema` export is replaced: the same command twice works, and every later one too.
    for _ in range(2):
        assert main(["ema", "--run", str(run_copy), "--sigma-rel", "0.07"]) == 0
    assert main(["ema", "--run", str(run_copy), "--sigma-rel", "0.08"]) == 0


# ---------------------------------------------------------------------------------------------------------
# 6. A results folder at the data folder itself or at one of its classes is refused
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data folder", "class folder", "run folder"])
def test_a_results_folder_at_the_data_folder_or_a_class_is_refused(tmp_path, where):
    from conftest import make_image_folder
    from fastdit.train.loop import train
    from test_train import tiny_config

    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    results, name = {"data folder": (images, None), "class folder": (images / "cat", None),
                     "run folder": (tmp_path, "images")}[where]
    before = files_of(images)
    config = tiny_config(results, data_path=str(images), vae="pixels", image_size=8, num_classes=2,
                         global_batch_size=4, max_steps=1, run_name=name)
    expected = {"data folder": r"--results-dir .* is the data folder .* itself: what fastdit writes there would be "
                               r"read as classes",
                "class folder": r"--results-dir .* is the class folder 'cat' of the data folder .* \(it holds "
                                r"'0.png'\): that class would be left out and the labels renumbered",
                "run folder": r"run folder \(--run-name\) .* is the data folder"}[where]
    with pytest.raises(UserError, match=expected) as info:
        train(config)
    one_line(info)
    assert files_of(images) == before and sorted(p.name for p in images.iterdir()) == ["cat", "dog"]


def test_extract_into_a_class_folder_is_refused(tmp_path):
    from conftest import make_image_folder
    from fastdit.data.extract import ExtractConfig, extract_latents

    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    with pytest.raises(UserError, match=r"--features-path .* is the class folder 'dog'") as info:
        extract_latents(ExtractConfig(data_path=str(images), features_path=str(images / "dog"), vae="pixels",
                                      image_size=16, num_workers=0, progress=False, device="cpu"))
    one_line(info)
    assert not (images / "dog" / "plan.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 2. A damaged crop in a --with-images store is found when the store is opened or verified
# ---------------------------------------------------------------------------------------------------------


def store_with_crops(folder: Path, damage=None):
    """A finished 7-item store with 16-px crops (shards of 3); `damage(crops)` edits the PNG bytes first."""
    from fastdit.data.latent_store import encode_png, finalize_store, open_for_writing, write_shard
    from test_data_latent_store import make_plan

    plan = make_plan(with_images=True)
    generator = torch.Generator().manual_seed(0)
    open_for_writing(folder, plan)
    crops = [encode_png(torch.randint(0, 256, (3, 16, 16), generator=generator, dtype=torch.uint8))
             for _ in range(plan.num_sources)]
    if damage:
        damage(crops)
    for shard in range(plan.num_shards):
        sources = list(plan.shard_sources(shard))
        write_shard(folder, shard, mean=torch.randn(len(sources), 2, 4, 2, 2, generator=generator),
                    std=torch.rand(len(sources), 2, 4, 2, 2, generator=generator),
                    label=torch.tensor([s % 3 for s in sources]), source=torch.tensor(sources), skipped=[],
                    images=[crops[s] for s in sources])
    finalize_store(folder, plan, data_path=folder / "images")
    return folder


def small_crop(crops):
    from fastdit.data.latent_store import encode_png

    crops[4] = encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("damage, problem", [
    (small_crop, "8x8 pixels (bit depth 8, colour type 2), not 16x16 8-bit RGB"),
    (lambda crops: crops.__setitem__(4, b"not a png at all, just some bytes of another file"), "not a PNG"),
    (lambda crops: crops.__setitem__(4, crops[4][:-30]), "cut short (no PNG end)"),
    (lambda crops: crops.__setitem__(4, b""), "0 bytes, too short for a PNG"),
], ids=["wrong size", "unreadable", "cut short", "empty"])
def test_a_damaged_crop_is_refused_when_the_store_is_opened(tmp_path, damage, problem):
    from fastdit.data import LatentStoreDataset

    store = store_with_crops(tmp_path / "store", damage)
    with pytest.raises(UserError, match="holds 1 damaged item") as info:
        LatentStoreDataset(store, with_images=True)
    message = one_line(info)
    assert f"(item 4, in shard-00001.safetensors: {problem}); delete shard-00001.safetensors and rerun " \
           f"`fastdit extract --data-path {store / 'images'} --features-path {store}" in message
    assert message.endswith("--with-images` to encode them again from the images")
    LatentStoreDataset(store)  # the latents alone are whole


def test_a_crop_damaged_in_its_middle_is_skipped_and_counted_while_training_and_found_by_verify(tmp_path, capsys):
    from fastdit.data import LatentStoreDataset
    from fastdit.data.latent_store import verify_store

    def overwrite_middle(crops):
        middle = len(crops[4]) // 2
        crops[4] = crops[4][:middle] + bytes(8) + crops[4][middle + 8:]

    store = store_with_crops(tmp_path / "store", overwrite_middle)
    dataset = LatentStoreDataset(store, seed=1, with_images=True)  # its header and end are whole
    latent, label, image = dataset[4]  # item 5 stands in for it
    expected = dataset[5]
    assert torch.equal(latent, expected[0]) and label == expected[1] and torch.equal(image, expected[2])
    dataset[4]
    err = capsys.readouterr().err
    assert err.count("warning: latent store") == 1 and "1 item(s) skipped so far" in err
    with pytest.raises(UserError, match=r"holds 1 damaged item\(s\) \(item 4, in shard-00001.safetensors: not a "
                                        r"readable PNG") as info:
        verify_store(store, progress=False)
    one_line(info)
    assert verify_store(store_with_crops(tmp_path / "whole"), progress=False) == 7


def test_extract_verify_names_the_damaged_shard_and_the_same_command_mends_it(tmp_path, capsys):
    from conftest import make_image_folder
    from fastdit.cli import main
    from fastdit.data import LatentStoreDataset
    from fastdit.data.latent_store import IMAGE_BYTES
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    store = tmp_path / "store"
    argv = ["extract", "--data-path", images, "--features-path", store, "--vae", "pixels", "--image-size", "16",
            "--num-workers", "0", "--shard-size", "2", "--with-images", "--no-progress", "--device", "cpu"]
    assert main([str(a) for a in [*argv, "--verify"]]) == 0
    shard = store / "shard-00001.safetensors"
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tensors[IMAGE_BYTES][60:80] = 0  # inside the first crop's pixel data
    save_file(tensors, str(shard), metadata=metadata)
    message = cli_error([*argv, "--verify"], capsys)
    assert "holds 1 damaged item(s) (item 2, in shard-00001.safetensors: not a readable PNG" in message
    assert "delete shard-00001.safetensors and rerun `fastdit extract" in message
    shard.unlink()
    assert main([str(a) for a in [*argv, "--verify"]]) == 0
    assert len(LatentStoreDataset(store, with_images=True)) == 4


def test_threads_beyond_the_usable_cores_are_refused(monkeypatch, capsys):
    from fastdit import cpu_threads

    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    for huge in (3, 2**40):
        with pytest.raises(UserError, match=rf"--threads {huge} is more than the 2 cores.*pass --threads 2 or fewer"):
            cpu_threads.configure_threads(huge)
    message = cli_error(["ema", "--threads", "4096", "--run", "x", "--sigma-rel", "0.1"], capsys)
    assert "--threads 4096 is more than the" in message


def test_a_job_whose_files_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil

    from fastdit.io import check_free_space

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    check_free_space(tmp_path / "not yet", 10**8, "50000 samples", "ask for fewer")
    with pytest.raises(UserError, match=r"10000000 samples at 256 px need about 3932.16 GB in '.*/out', but 1.00 GB "
                                        r"are free there; choose another --out or ask for fewer") as info:
        check_free_space(tmp_path / "out", 10**7 * 256 * 256 * 3 * 2, "10000000 samples at 256 px",
                         "choose another --out or ask for fewer")
    one_line(info)


# ---------------------------------------------------------------------------------------------------------
# 11. Settings that would silently do nothing
# ---------------------------------------------------------------------------------------------------------


def test_a_routing_rate_that_routes_no_token_is_refused_before_training(tmp_path):
    from fastdit.train.loop import train
    from test_train import tiny_config

    # DiT-T/2 at 8 px: 4x4 = 16 tokens; 0.05 x 16 < 1
    with pytest.raises(UserError, match=r"--route 0.05 routes no token of this model's 16 tokens per sample "
                                        r"\(floor\(0.05 x 16\) = 0\), so it would change nothing; pass --route 0.063") as info:
        train(tiny_config(tmp_path, route=0.05, route_blocks="0:1", max_steps=1))
    one_line(info)
    assert not any(tmp_path.rglob("*.pt")) and not any(tmp_path.rglob("config.json"))
    assert train(tiny_config(tmp_path, route=0.0625, route_blocks="0:1", max_steps=1)).step == 1


@pytest.mark.parametrize("settings, message", [
    (dict(meanflow_omega_max=3.0), "--meanflow-omega-max 3 sets the range of guidance scales that "
                                   "--meanflow-guidance-input trains; pass --meanflow-guidance-input too"),
    (dict(meanflow_guidance_input=True, meanflow_omega_max=1.0), "with --meanflow-omega-max 1 trains the one scale 1"),
    (dict(meanflow_p=0.0, meanflow_c=0.1), "--meanflow-c 0.1 is the constant of the adaptive weight"),
    (dict(meanflow_v_loss=True, meanflow_ratio=0.0), "--meanflow-v-loss changes the target of the samples with r != t"),
], ids=["omega-max alone", "omega-max 1", "c with p 0", "v-loss with ratio 0"])
def test_meanflow_options_without_the_option_they_modify_are_refused(settings, message):
    from fastdit.objectives import build_objective

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        build_objective("meanflow", **settings)
    one_line(info)


@pytest.mark.parametrize("eps", [1e-50, 1e-39, 1e-9])
def test_x_pred_epsilon_below_float32s_resolution_is_refused(eps):
    from fastdit.objectives import build_objective

    with pytest.raises(UserError, match=r"--x-pred-t-eps must be in \[1.19e-07, 1\]") as info:
        build_objective("x-pred", x_pred_t_eps=eps)
    one_line(info)


# ---------------------------------------------------------------------------------------------------------
# 9. A named pipe (or any non-file) where fastdit reads a file is refused, never waited on
# ---------------------------------------------------------------------------------------------------------


class Watchdog:
    """Plays the writer of `fifo` after `seconds`, so that a reader that waits on it fails the test
    instead of hanging the suite. A process, not a thread: a reader blocked in a library's open() may
    hold the GIL, and a thread could then never run."""

    SCRIPT = """
import os, sys, time
fifo, marker, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(seconds)
while True:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        open(marker, "w").close()
    except OSError:
        pass
    time.sleep(0.1)
"""

    def __init__(self, fifo: Path, seconds: float = 5):
        self.fifo, self.seconds = fifo, seconds
        self.marker = fifo.with_name(fifo.name + ".released")

    def __enter__(self):
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(self.fifo), str(self.marker),
                                         str(self.seconds)])
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
        released = self.marker.exists()
        self.marker.unlink(missing_ok=True)
        assert not released, f"{self.fifo} was waited on"


def make_fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


@fifos
def test_a_named_pipe_as_a_snapshot_is_refused(run_copy, capsys):
    fifo = make_fifo(run_copy / "posthoc_ema" / "0000004-sigma0.1.safetensors")
    with Watchdog(fifo):
        message = cli_error(["ema", "--run", run_copy, "--sigma-rel", "0.07"], capsys)
    assert "is not a regular file (a named pipe, socket or device" in message


@fifos
def test_a_named_pipe_as_a_checkpoint_or_an_encoder_is_refused(tmp_path, capsys):
    fifo = make_fifo(tmp_path / "model.safetensors")
    with Watchdog(fifo):
        message = cli_error(["sample", "--ckpt", fifo, "--out", tmp_path / "x.png"], capsys)
        assert f"checkpoint {str(fifo)!r} is not a regular file" in message
        with pytest.raises(UserError, match="encoder file .* is not a regular file"):
            load_encoder(str(make_fifo(tmp_path / "encoder.pt")))
        weights = make_fifo(tmp_path / "dinov2" / "weights.safetensors")
        (weights.parent / "config.json").write_text("{}")
        with pytest.raises(UserError, match="is not a regular file"):
            load_encoder(f"dinov2-vitb14={weights}")


@fifos
def test_a_named_pipe_as_a_store_shard_or_record_is_refused(tmp_path):
    from fastdit.data import LatentStore

    store = store_with_crops(tmp_path / "store")
    shard = make_fifo(store / "shard-00001.safetensors")
    with Watchdog(shard), pytest.raises(UserError, match="shard .*shard-00001.safetensors' is not a regular file"):
        LatentStore(store)
    meta = make_fifo(store / "meta.json")
    with Watchdog(meta), pytest.raises(UserError, match="latent store record .*meta.json' is not a regular file"):
        LatentStore(store)


# ---------------------------------------------------------------------------------------------------------
# 8. Damaged or foreign files
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_a_data_record_that_is_no_file_is_refused_not_replaced(tmp_path, kind):
    from fastdit.train.data_record import DATA_RECORD
    from fastdit.train.loop import train
    from test_train import tiny_config

    config = tiny_config(tmp_path, max_steps=2, ckpt_every=2)
    run_dir = train(config).run_dir
    record = run_dir / DATA_RECORD
    record.unlink()
    if kind == "folder":
        record.mkdir()
        (record / "mine.txt").write_text("kept")
    else:
        make_fifo(record)
    with Watchdog(record):
        with pytest.raises(UserError, match=r"data record .*data.json' is (a folder|not a regular file).*remove it") as info:
            train(tiny_config(tmp_path, max_steps=4, ckpt_every=2))
    one_line(info)
    assert kind == "pipe" or (record / "mine.txt").read_text() == "kept"


@pytest.mark.parametrize("recipe, field", [
    ({"num_steps": "many"}, "num_steps = \"many\""),
    ({"guidance_interval": 5}, "guidance_interval = 5"),
    ({"cfg_scale": True}, "cfg_scale = true"),
    ({"guided_channels": [1, 2]}, "guided_channels = [1, 2]"),
], ids=["steps", "interval", "cfg", "channels"])
def test_a_malformed_sampling_recipe_in_a_model_record_is_one_line(tmp_path, capsys, recipe, field):
    from fastdit.checkpoint import export_weights
    from fastdit.model_info import LatentInfo, ModelInfo
    from fastdit.models import build_model

    model = build_model("DiT-T/4", input_size=16, num_classes=10)
    info = ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None, scale_factor=1.0), sampling=recipe)
    path = export_weights(model, info, tmp_path / "tiny.safetensors")
    message = cli_error(["sample", "--ckpt", path, "--out", tmp_path / "x.png", "--no-progress"], capsys)
    assert f"the checkpoint's sampling recipe has {field}, which is no value of --" in message
    assert not (tmp_path / "x.png").exists()


def test_a_crafted_settings_entry_is_read_before_the_feature_pass(tmp_path, capsys):
    import io
    import zipfile

    import numpy as np

    from fastdit.cli import evaluate, main

    samples = tmp_path / "samples.npz"
    np.savez(samples, np.zeros((4, 8, 8, 3), np.uint8))
    crafted = json.dumps({"recipe": {"preset": ["dit-xl2-256"], "overridden": 3}}).encode()
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(crafted, np.uint8))
    with zipfile.ZipFile(samples, "a") as archive:
        archive.writestr("fastdit_settings.npy", buffer.getvalue())
    # Before the features: the warning comes first, then the missing Inception weights (the test cache is
    # empty and offline) end the run where the feature pass would start.
    with pytest.raises(SystemExit):
        main(["evaluate", str(samples), str(samples)])
    err = capsys.readouterr().err
    assert "records fastdit settings that do not parse (its preset is not a name)" in err
    assert err.index("warning:") < err.index("error:")
    assert evaluate.published_line(samples, {"fid": 1.0}) is None
    capsys.readouterr()


@pytest.mark.parametrize("section, content, message", [
    ("alignment", {}, "the checkpoint's REPA section \\(alignment\\) is malformed"),
    ("alignment", {"projector": {}, "optimizer": {}}, "the checkpoint's REPA projector does not fit"),
], ids=["empty", "no weights"])
def test_a_checkpoint_with_a_malformed_extension_section_is_one_line(tmp_path, section, content, message):
    from fastdit.train.loop import train
    from test_train import tiny_config

    fields = dict(repa=digit_encoder(tmp_path / "encoder.ts", seed=1), repa_depth=1, repa_projector_dim=32,
                  ckpt_every=2)
    run = train(tiny_config(tmp_path / "runs", max_steps=2, **fields)).run_dir
    checkpoint = run / "checkpoints" / "0000002.pt"
    state = torch.load(checkpoint, weights_only=True)
    state[section] = content
    torch.save(state, checkpoint)
    with pytest.raises(UserError, match=message) as info:
        train(tiny_config(tmp_path / "runs", max_steps=4, **fields))
    one_line(info)


def test_a_checkpoint_with_malformed_posthoc_averages_is_one_line(tmp_path):
    from fastdit.train.loop import train
    from test_train import tiny_config

    fields = dict(posthoc_ema=True, posthoc_every=2, ckpt_every=2)
    run = train(tiny_config(tmp_path, max_steps=2, **fields)).run_dir
    checkpoint = run / "checkpoints" / "0000002.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["posthoc_ema"][1] = {"pos_embed": torch.zeros(3)}
    torch.save(state, checkpoint)
    with pytest.raises(UserError, match="the checkpoint's post-hoc EMAs do not fit the model") as info:
        train(tiny_config(tmp_path, max_steps=4, **fields))
    one_line(info)


# ---------------------------------------------------------------------------------------------------------
# 10. dopri5 on a model that outputs NaN ends in fastdit's non-finite message, not torchdiffeq's assertion
# ---------------------------------------------------------------------------------------------------------


def test_dopri5_on_a_nan_velocity_reaches_fastdits_non_finite_message():
    pytest.importorskip("torchdiffeq")
    from fastdit.sampling.flow import ode_dopri5
    from fastdit.sampling.generate import check_finite

    def velocity(x, t, **_):
        return torch.where(t.view(-1, 1) > 0.5, torch.full_like(x, float("nan")), -x)

    x = torch.ones(3, 4)
    result = ode_dopri5(velocity, x, torch.linspace(0, 1, 3, dtype=torch.float64))
    assert result.shape == x.shape and torch.isnan(result).all()
    with pytest.raises(UserError, match=r"sampling gave non-finite latents \(NaN or inf\) for 3 of 3 image\(s\)"):
        check_finite(result, "latents", range(3))


# ---------------------------------------------------------------------------------------------------------
# 12. The app: what a page sends is a one-line message, never "unexpected ..."
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["²", "١٢", "99999999999999999999999 x", "10000001"])
def test_app_classes_that_are_no_class_are_one_line(choice):
    pytest.importorskip("gradio")
    from fastdit.app.classes import label_of
    from fastdit.app.page import error_message

    with pytest.raises(UserError, match="is not one of the model's classes; pick one from the list") as info:
        label_of(choice)
    assert not error_message(info.value).startswith("**Error:** unexpected")
    assert label_of("207 golden retriever") == 207


@pytest.mark.parametrize("path", ["a" * 5000 + ".pt", "/tmp/" + "b" * 300 + ".safetensors", "~nobody-here-x/m.pt"],
                         ids=["longer than a path", "longer than a name", "no such home"])
def test_app_checkpoint_paths_the_file_system_refuses_are_one_line(path):
    from fastdit.app.models import readable_checkpoint

    with pytest.raises(UserError, match="no readable checkpoint at .*; check the Checkpoint field") as info:
        readable_checkpoint(path)
    assert len(str(info.value)) < 400


# ---------------------------------------------------------------------------------------------------------
# 13. Presets: one that cannot sample the default model refuses before any download; overrides recorded
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--preset", "repa-sde-250"], "preset repa-sde-250 samples flow models you trained, but without --ckpt the "
                                   "official DiT-XL/2 weights would be sampled, a ddpm model; pass --ckpt with a flow "
                                   "model"),
    (["--preset", "sit-xl2-sde", "--model", "DiT-XL/2"], "preset sit-xl2-sde samples flow models, but without --ckpt "
                                                         "the official DiT-XL/2 weights would be sampled, a ddpm model; "
                                                         "pass --ckpt with a flow model, or --model SiT-XL/2"),
], ids=["repa", "sit with --model DiT"])
def test_a_preset_that_cannot_sample_the_official_weights_refuses_before_downloading(tmp_path, capsys, monkeypatch,
                                                                                      flags, message):
    from fastdit import checkpoint, hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was started")

    monkeypatch.setattr(hub, "download", no_download)
    monkeypatch.setattr(checkpoint, "download", no_download)
    line = cli_error(["sample", *flags, "--out", tmp_path / "x.png"], capsys)
    assert message in line


def test_a_flag_that_replaces_a_preset_field_is_recorded_as_an_override():
    from fastdit.sampling.presets import get_preset
    from fastdit.sampling.recipe import resolve

    resolved = resolve({}, get_preset("dit-xl2-256").as_source(), {"num_samples": 4})
    resolved.note_override("label_sampling", "--class-labels", [1, 2, 3])
    assert resolved["label_sampling"] == "random"  # the job reads given labels; the value stays
    assert resolved.to_dict()["overridden"]["label_sampling"] == {"flag": "--class-labels", "was": "random",
                                                                   "now": [1, 2, 3]}
    assert "--class-labels overrode label_sampling (random -> [1, 2, 3])" in resolved.describe()
