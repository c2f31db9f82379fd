"""`fastdit train-decoder` from the command line, on stand-ins this file builds: the tiny RAE encoder of the
latent-space fixtures (tests/rae_latent_stand_ins.py: DINOv2 with registers, 4x4 tokens 16 wide at 16 px),
a folder of random PNGs, random LPIPS / DINO / Inception weights served by the test file server or put in
the cache folder. A run writes checkpoints, the EMA decoder and an RAE folder that `fastdit extract` reads;
a killed run resumes bit for bit; 2 processes train as 1; bf16 stays finite; missing weights offline and
bad flags are one line. Parity with RAE's own code is tests/test_train_decoder_parity.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from conftest import make_image_folder
from fastdit.decoder_training import weights
from fastdit.decoder_training.config import DecoderTrainConfig
from fastdit.decoder_training.discriminator import random_dino_state_dict
from fastdit.decoder_training.loop import train_decoder
from fastdit.errors import UserError
from fastdit.decoder_training.lpips import random_lin_state_dict, random_vgg16_state_dict
from fastdit.evaluate.inception import random_inception_state_dict
from fastdit.rae.space import describe, load_rae_space
from rae_latent_stand_ins import IMAGE_SIZE, LATENT_SHAPE, write_tiny_rae_folder
from test_train import assert_same_tensors, kill_once_checkpointed

REPO = Path(__file__).resolve().parents[1]
# The three files decoder training fetches besides the encoder: (cache subfolder, file name, URL constant's
# module and name) - the tests point the URLs at the file server.
WEIGHT_FILES = {
    "vgg": (weights.LPIPS_SUBDIR, weights.VGG16_FILE, "fastdit.decoder_training.lpips", "VGG16_URL"),
    "lin": (weights.LPIPS_SUBDIR, weights.LPIPS_LIN_FILE, "fastdit.decoder_training.lpips", "LPIPS_LIN_URL"),
    "dino": (weights.DINO_DISC_SUBDIR, weights.DINO_DISC_FILE, "fastdit.decoder_training.discriminator",
             "DINO_DISC_URL"),
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict:
    """The encoder, the images and the weight files, once for the module."""
    root = tmp_path_factory.mktemp("decoder-stand-ins")
    files = {"vgg": random_vgg16_state_dict(seed=1), "lin": random_lin_state_dict(seed=2),
             "dino": random_dino_state_dict(seed=3)}
    paths = {}
    for name, state in files.items():
        paths[name] = root / "weights" / name / WEIGHT_FILES[name][1]
        paths[name].parent.mkdir(parents=True)
        torch.save(state, paths[name])
    inception = root / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), inception)
    return {"encoder": write_tiny_rae_folder(root / "rae"), "images": make_image_folder(root / "images", per_class=4),
            "heldout": make_image_folder(root / "heldout", classes=("held",), per_class=6), "weights": paths,
            "inception": inception}


def put_in_cache(stand_ins, names=("vgg", "lin", "dino")) -> None:
    """Link the weight files `names` where the download would put them (this test's own cache folder)."""
    cache = Path(os.environ["FASTDIT_CACHE"])
    for name in names:
        subdir, filename, _, _ = WEIGHT_FILES[name]
        (cache / subdir).mkdir(parents=True, exist_ok=True)
        (cache / subdir / filename).symlink_to(stand_ins["weights"][name])


# 12 training images at batch 4: 3 steps an epoch. LPIPS from the start, the discriminator from step 3 and
# the GAN term from step 6 (RAE's order, compressed), a 2-block decoder 32 wide, the DINO discriminator
# reading 16 px (2x2 tokens: cheap on a CPU).
def tiny_fields(stand_ins, results_dir, **overrides) -> dict:
    fields = dict(encoder=stand_ins["encoder"], data_path=str(stand_ins["images"]), image_size=IMAGE_SIZE,
                  decoder_depth=2, decoder_hidden_size=32, decoder_num_heads=2, decoder_mlp_size=64,
                  global_batch_size=4, epochs=4.0, warmup_epochs=0.5, lr=1e-3, final_lr=1e-4, disc_lr=1e-3,
                  disc_final_lr=1e-4, ema_decay=0.9, disc_start_epoch=1.0, gan_start_epoch=2.0, disc_input_size=16,
                  num_workers=0, log_every=1, ckpt_every=2, progress=False, tensorboard=False,
                  results_dir=str(results_dir))
    fields.update(overrides)
    return fields


def cli_flags(fields: dict) -> list[str]:
    """The command-line flags of `fields` (flat config keys)."""
    flags = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def final_state(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("*[0-9].pt"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)


def test_a_run_downloads_its_weights_reports_rfid_and_leaves_an_rae_latent_space(stand_ins, tmp_path, file_server,
                                                                                  monkeypatch, capsys):
    port = file_server.server_address[1]
    for name, (_, filename, module, constant) in WEIGHT_FILES.items():
        file_server.files[f"/{name}/{filename}"] = stand_ins["weights"][name].read_bytes()
        monkeypatch.setattr(f"{module}.{constant}", f"http://127.0.0.1:{port}/{name}/{filename}")
    fields = tiny_fields(stand_ins, tmp_path / "runs", max_steps=7, ckpt_every=3, keep_last=2,
                         eval_data=str(stand_ins["heldout"]), inception_weights=str(stand_ins["inception"]))
    assert run_cli("train-decoder", *cli_flags(fields)) == 0
    out = capsys.readouterr().out
    # Each file fetched once, into the cache.
    assert sorted(file_server.requests) == sorted(f"/{n}/{f}" for n, (_, f, _, _) in WEIGHT_FILES.items())
    run_dir = tmp_path / "runs" / DecoderTrainConfig.create(**fields).resolved_run_name()
    assert re.search(r"rFID \d+\.\d{3}, PSNR \d+\.\d{2} dB on 6 held-out images", out), out
    assert f"done: step 7, run folder {run_dir}" in out and f"--vae rae:{run_dir}" in out
    # The last 2 checkpoints (every 3 steps and at the end), each beside its EMA export.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "0000006-ema.safetensors", "0000006.pt", "0000007-ema.safetensors", "0000007.pt"]
    state = final_state(run_dir)
    assert state["position"] == {"step": 7, "epoch": 2, "step_in_epoch": 1}
    assert state["disc"] is not None and state["token_stats"]["count"] == 7 * 4
    record = json.loads((run_dir / "rae.json").read_text())
    assert record["decoder_weights"] == "checkpoints/0000007-ema.safetensors"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 8)) and metrics[-1]["step"] == 7 and "eval/rfid" in metrics[-1]
    assert {"l1", "lpips", "gan", "d_weight", "disc_loss"} <= steps[-1].keys() and steps[-1]["gan"] != 0

    # The run folder is an RAE latent space: its shape, the EMA decoder, statistics of the tokens seen.
    name = f"rae:{run_dir}"
    spec = describe(name)
    assert spec.latent_shape == LATENT_SHAPE and spec.image_size == IMAGE_SIZE
    space = load_rae_space(name)
    assert_same_tensors(space.decoder.state_dict(), state["ema"])
    sums = state["token_stats"]
    torch.testing.assert_close(space.mean, (sums["sum"] / sums["count"]).float())
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    latents = space.encode(images)
    assert latents.shape == (2, *LATENT_SHAPE) and space.decode(latents).shape == images.shape
    # ... which `fastdit extract` takes as --vae.
    store = tmp_path / "store"
    assert run_cli("extract", "--vae", name, "--data-path", stand_ins["heldout"], "--features-path", store,
                   "--image-size", IMAGE_SIZE, "--num-workers", 0, "--no-progress") == 0
    assert json.loads((store / "meta.json").read_text())["vae"] == name


def test_sigkill_and_rerun_gives_bit_identical_training(stand_ins, tmp_path):
    """8 steps: the discriminator trains from step 3, the GAN term from step 6; killed once checkpoint 4 is
    written (or 6), then the same command again, against one uninterrupted in-process run."""
    put_in_cache(stand_ins)
    fields = tiny_fields(stand_ins, tmp_path / "reference", max_steps=8)
    reference = train_decoder(DecoderTrainConfig.create(**fields))
    assert reference.step == 8
    command = [sys.executable, "-m", "fastdit", "train-decoder",
               *cli_flags({**fields, "results_dir": str(tmp_path / "killed")})]
    run_dir = tmp_path / "killed" / reference.run_dir.name
    kill_once_checkpointed(command, run_dir, step=4, last=8)
    rerun = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert re.search(r"resuming from \S*?000000[46]\.pt", rerun.stdout)
    resumed, uninterrupted = final_state(run_dir), final_state(reference.run_dir)
    assert resumed["position"] == uninterrupted["position"] == {"step": 8, "epoch": 2, "step_in_epoch": 2}
    for part in ("decoder", "ema", "disc", "token_stats"):
        assert_same_tensors(resumed[part], uninterrupted[part])
    for part in ("optimizer", "disc_optimizer"):
        for a, b in zip(resumed[part]["state"].values(), uninterrupted[part]["state"].values()):
            assert_same_tensors(a, b)
    assert (run_dir / "latent-stats.pt").read_bytes() == (reference.run_dir / "latent-stats.pt").read_bytes()


def test_two_processes_train_like_one(stand_ins, tmp_path):
    """torchrun, 2 processes (DDP over gloo) at the same global batch as 1 process, 4 steps: the
    discriminator from step 1, the GAN term (its adaptive weight from the global batch's gradients) from
    step 2. The discriminator reads 32 px (4x4 tokens): its heads normalise each sample over its tokens, and
    over the 2x2 tokens of 16 px that normalisation's backward amplifies rounding ~1e4-fold (README of
    tests/fixtures/rae-decoder), which would hide a real difference. Its learning rate is 1e-5: AdamW's
    first steps move every coordinate by about lr whatever its gradient, so coordinates whose gradient is
    rounding noise step in opposite directions in the two runs, and at 1e-3 (6% of these heads' weights)
    the GAN term feeds that back into the decoder within two steps."""
    put_in_cache(stand_ins)
    fields = tiny_fields(stand_ins, tmp_path / "two", max_steps=4, ckpt_every=4, disc_start_epoch=1 / 3,
                         gan_start_epoch=2 / 3, disc_input_size=32, disc_lr=1e-5, disc_final_lr=1e-6, device="cpu")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastdit",
               "train-decoder", *cli_flags(fields)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved") == 1 and "2 process(es)" in result.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order within a process
    try:
        one = train_decoder(DecoderTrainConfig.create(**{**fields, "results_dir": str(tmp_path / "one")}))
    finally:
        torch.set_num_threads(threads)
    two, one = final_state(tmp_path / "two" / one.run_dir.name), final_state(one.run_dir)
    assert two["position"] == one["position"]
    # The token statistics are float64 sums of the same float32 tokens, added in another grouping.
    for key in ("sum", "sum_sq", "count"):
        torch.testing.assert_close(two["token_stats"][key], one["token_stats"][key], rtol=1e-12, atol=1e-12)
    # AdamW's first moments, (1 - beta1) sums of the gradients: those of the global batch, equal up to
    # rounding (measured: 7e-8 of the largest for the decoder, 4e-6 for the heads, whose gradient passes
    # the per-sample normalisation); a missing all-reduce or a per-process adaptive weight is off by O(1).
    for part, bound in (("optimizer", 1e-5), ("disc_optimizer", 1e-4)):
        a = torch.cat([s["exp_avg"].flatten() for s in two[part]["state"].values()])
        b = torch.cat([s["exp_avg"].flatten() for s in one[part]["state"].values()])
        assert (a - b).abs().max() <= bound * b.abs().max(), part
    for part, lr in (("decoder", 1e-3), ("ema", 1e-3), ("disc", 1e-5)):
        assert two[part].keys() == one[part].keys()
        assert_same_after_adam(two[part], one[part], part, steps=4, lr=lr)


def assert_same_after_adam(two: dict, one: dict, part: str, *, steps: int, lr: float) -> None:
    """1 and 2 processes see the same draws (every draw is a function of seed, step and sample) and compute
    the same gradients up to summation order: each process's mean over 2 images, then the mean of the two,
    against one mean over 4. AdamW turns a gradient into a step of about lr per coordinate whatever its
    size, so where a coordinate's gradient is itself rounding noise (the attention's key biases, whose
    gradient is 0 in exact arithmetic; near-zero directions of the heads) the two runs may step it in
    different directions (measured: 17 of 19,856 decoder entries, 261 of 7.4M discriminator entries). So:
    over all of a network's weights, 99% of the entries agree to 1e-5 relative (a real divergence moves most
    of them), and none differs by more than the most AdamW can move a weight in `steps` steps, lr (1 - beta1)
    / sqrt(1 - beta2) a step (Kingma & Ba 2015, section 2.1; beta2 = 0.95 here), twice over (each run moving
    its own way); the EMA, an average of weights, stays within the same bound."""
    a = torch.cat([two[key].double().flatten() for key in one])
    b = torch.cat([one[key].double().flatten() for key in one])
    close = torch.isclose(a, b, rtol=1e-5, atol=1e-6)
    assert close.double().mean() >= 0.99, f"{part}: {int((~close).sum())} of {b.numel()} entries differ"
    most = 2 * steps * lr * (1 - 0.9) / (1 - 0.95) ** 0.5
    assert ((a - b).abs() <= most).all(), f"{part}: entries differ by more than AdamW can move them"


def test_bf16_trains_with_finite_losses(stand_ins, tmp_path):
    put_in_cache(stand_ins)
    result = train_decoder(DecoderTrainConfig.create(**tiny_fields(
        stand_ins, tmp_path, max_steps=3, ckpt_every=3, precision="bf16", disc_start_epoch=1 / 3,
        gan_start_epoch=2 / 3)))
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all("loss" in m for m in metrics) and metrics[-1]["gan"] != 0
    assert all(torch.isfinite(torch.tensor([m["loss"], m["disc_loss"], m["grad_norm"]])).all() for m in metrics)
    state = final_state(result.run_dir)
    assert all(torch.isfinite(v).all() for v in state["ema"].values())


def test_a_torchscript_encoder_on_the_digits_makes_a_gray_rae_latent_space(tmp_path):
    """The digits demo's path (`fastdit demo --latent rae`): a TorchScript encoder (here the demo's
    architecture, untrained), L1 alone at 8 px; the run folder keeps a copy of the encoder and is a latent
    space of gray 8-px images that `fastdit train` reads the digits in."""
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder

    torch.manual_seed(0)
    encoder = save_digit_encoder(DigitTokens().eval(), tmp_path / "digit-encoder.ts")
    result = train_decoder(DecoderTrainConfig.create(
        encoder=str(encoder), data_path="digits", image_size=8, decoder_depth=1, decoder_hidden_size=32,
        decoder_num_heads=2, decoder_mlp_size=64, perceptual_weight=0.0, disc_weight=0.0, global_batch_size=16,
        max_steps=2, num_workers=0, progress=False, tensorboard=False, results_dir=str(tmp_path / "runs")))
    assert (result.run_dir / "encoder.pt").read_bytes() == encoder.read_bytes()
    space = load_rae_space(f"rae:{result.run_dir}")
    assert space.image_channels == 1 and (space.channels, space.grid_size, space.image_size) == (64, 4, 8)
    digits = torch.rand(3, 1, 8, 8) * 2 - 1
    assert space.decode(space.encode(digits)).shape == digits.shape
    with pytest.raises(UserError, match="encodes gray images"):
        space.encode(digits.expand(-1, 3, -1, -1))
    assert run_cli("train", "--data-path", "digits", "--vae", f"rae:{result.run_dir}", "--model", "DiTDH-T",
                   "--depth", 1, "--hidden-size", 64, "--num-heads", 2, "--objective", "rae", "--image-size", 8,
                   "--global-batch-size", 8, "--max-steps", 1, "--num-workers", 0, "--no-progress", "--no-tensorboard",
                   "--results-dir", tmp_path / "dit") == 0


@pytest.mark.parametrize("missing", list(WEIGHT_FILES))
def test_missing_weights_offline_are_one_line_naming_file_address_and_destination(stand_ins, tmp_path, missing,
                                                                                  monkeypatch, capsys):
    put_in_cache(stand_ins, [name for name in WEIGHT_FILES if name != missing])
    subdir, filename, module, constant = WEIGHT_FILES[missing]
    url = f"http://127.0.0.1:9/{filename}"  # the discard port: nothing listens there
    monkeypatch.setattr(f"{module}.{constant}", url)
    code = run_cli("train-decoder", *cli_flags(tiny_fields(stand_ins, tmp_path / "runs", max_steps=1)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    destination = Path(os.environ["FASTDIT_CACHE"]) / subdir / filename
    assert f"could not download {filename} from {url}" in err and f"put it at {destination}" in err
    assert ("--disc-weight 0" if missing == "dino" else "--perceptual-weight 0") in err  # or train without it
    assert not (tmp_path / "runs").exists()  # nothing written by a command that cannot run


@pytest.mark.parametrize("flags, message", [
    (["--noise-tau", "-1"], "--noise-tau"),
    (["--image-size", "18"], "--image-size 18 is not a multiple of the encoder's 4x4 token grid"),
    (["--disc-input-size", "20"], "--disc-input-size must be a multiple of 8"),
    (["--disc-kernel-size", "4"], "--disc-kernel-size must be odd"),
    (["--image-size", "8"], "pass --perceptual-weight 0 for images this small"),
    (["--data-path", "digits"], "the digits are 8x8 px; pass --image-size 8"),
    (["--global-batch-size", "0"], "--global-batch-size"),
    (["--final-lr", "1"], "--final-lr / --disc-final-lr must not exceed --lr"),
    (["--eval-every", "2"], "--eval-every needs --eval-data"),
    (["--precision", "fp16"], "--precision"),
], ids=["noise-tau", "image-size", "disc-input-size", "kernel", "lpips-size", "digits-size", "batch", "final-lr",
        "eval-every", "precision"])
def test_bad_flags_are_one_line(stand_ins, tmp_path, flags, message, capsys):
    put_in_cache(stand_ins)
    fields = tiny_fields(stand_ins, tmp_path / "runs", max_steps=1)
    code = run_cli("train-decoder", *cli_flags(fields), *flags)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_recipe_and_the_command_is_listed(capsys):
    assert run_cli("--help") == 0
    assert re.search(r"train-decoder\s+train RAE's ViT decoder", capsys.readouterr().out)
    assert run_cli("train-decoder", "--help") == 0
    out = capsys.readouterr().out
    for flag in ("--encoder", "--noise-tau", "--perceptual-weight", "--disc-start-epoch", "--gan-start-epoch",
                 "--eval-data", "--precision"):
        assert flag in out
