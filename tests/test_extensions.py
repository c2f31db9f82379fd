"""Training methods as plug-ins (`fastdit.train.extensions`): the step, the loop and the checkpoints
name none of them; every method, alone and with the others, resumes bit-exactly, trains the same on
1 and 2 processes and under FSDP as under DDP; the dispersive loss against its definition."""

import io
import json
import math
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdit.cli import main
from fastdit.errors import UserError
from fastdit.train.config import SECTIONS, TrainConfig
from fastdit.train.extensions import EXTENSIONS, Term, TrainExtension
from fastdit.train.extensions.dispersive import dispersive_loss
from fastdit.train.loop import train
from test_train import (DISPERSE, DISPERSE_FIELDS, TINY, X_PRED, X_PRED_FIELDS, assert_same_tensors, final_state,
                        kill_once_checkpointed, tiny_config)
from test_train_distributed import assert_same_after_adam, torchrun

PACKAGE = Path(__file__).resolve().parents[1] / "fastdit"


# ----------------------------------------------------------------------------------------------
# the protocol
# ----------------------------------------------------------------------------------------------

# A training method's name, as a word or the start of one: REPA, token routing (route, routed,
# routing), post-hoc EMAs, the dispersive loss (disperse, dispersion, dispersive), representation alignment.
FEATURE_WORDS = re.compile(r"\b(repa|rout(e|es|ed|ing)|post-?hoc|dispers\w*|alignment)\b", re.IGNORECASE)


def words_of(path: Path) -> list[tuple[int, str]]:
    """Every name, string and comment of a module, with its line: what the module says in any form."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT):
            found.append((token.start[0], token.string))
    return found


@pytest.mark.parametrize("module", ["train/step.py", "train/loop.py", "train/state.py"])
def test_the_step_the_loop_and_the_checkpoints_name_no_training_method(module):
    named = [(line, FEATURE_WORDS.search(text.replace("_", " ")).group(0))
             for line, text in words_of(PACKAGE / module) if FEATURE_WORDS.search(text.replace("_", " "))]
    assert named == [], f"{module} names training methods at (line, word): {named}"


def test_the_pattern_finds_what_it_must():
    # The test above can fail: each method's spellings are caught, including inside identifiers.
    for text in ("REPA's projector", "state.alignment", "route_settings", "posthoc_ema", "post-hoc EMA",
                 "disperse_group", "Dispersion"):
        assert FEATURE_WORDS.search(text.replace("_", " ")), text
    assert not FEATURE_WORDS.search("prepare_model outer routine".replace("_", " "))


def test_every_extension_is_a_config_section_with_its_flags():
    for name, cls in EXTENSIONS.items():
        assert SECTIONS[cls.section] is cls.settings, name
    config = TrainConfig.create(disperse=0.5, route=0.25, repa="x.pt", posthoc_ema=True, ema_decay=0.99)
    assert (config.dispersion.disperse, config.routing.route, config.alignment.repa) == (0.5, 0.25, "x.pt")
    assert (config.posthoc.posthoc_ema, config.ema.ema_decay) == (True, 0.99)
    # The flat form every run folder records reads back to the same sections.
    assert TrainConfig.from_dict(config.to_dict()) == config == TrainConfig.from_dict(config.to_flat())


def test_an_old_run_config_with_the_methods_in_their_old_sections_still_reads(tmp_path):
    """Run folders written before the methods had sections of their own held the EMA and post-hoc settings
    in "optimisation": a config is read by flat key, so they resume."""
    old = TrainConfig.create(posthoc_ema=True, ema_decay=0.99).to_dict()
    moved = {section: dict(values) for section, values in old.items() if section not in ("ema", "posthoc")}
    moved["optimisation"].update(old["ema"], **old["posthoc"])
    assert TrainConfig.from_dict(moved) == TrainConfig.from_dict(old)


class Recorder(TrainExtension):
    """A toy method: one draw per sample, a term of weight 2 from the captured labels, a count of the
    hooks; not registered (the step takes whatever the state holds)."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def draw(self, generator, device):
        self.calls.append("draw")
        return {"recorder_u": torch.rand(1, generator=generator, device=device)}

    def training_inputs(self, micro):
        self.calls.append("inputs")
        return {}

    def loss_terms(self, micro, captured):
        self.calls.append("terms")
        return {"recorded": Term(micro.draws.extra["recorder_u"], 2.0)}

    def after_backward(self):
        self.calls.append("after_backward")

    def after_step(self, model, step, taken):
        self.calls.append(f"after_step {step} taken {float(taken):g}")


def test_a_method_added_to_the_state_takes_part_through_its_hooks():
    from fastdit.distributed import DistInfo
    from fastdit.model_info import LatentInfo
    from fastdit.models import build_model
    from fastdit.train.loop import build_training_state
    from fastdit.train.step import train_step
    from fastdit.train.training_data import TrainingData

    config = tiny_config("unused", global_batch_size=4, micro_batch_size=2)
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    data = TrainingData(dataset=None, latent_shape=(1, 8, 8), latent_info=LatentInfo(kind="pixels", vae=None),
                        class_names=None, device=torch.device("cpu"))
    state = build_training_state(config, DistInfo(0, 1, 0, torch.device("cpu")), model, data)
    assert [extension.name for extension in state.extensions] == ["ema"]  # every run has its EMA
    recorder = Recorder()
    state.extensions.append(recorder)
    result = train_step(state, (torch.rand(4, 1, 8, 8), torch.arange(4)), config.build_objective())
    # 4 samples drawn, 2 micro-batches of inputs and terms, then the after-backward and after-step hooks.
    assert recorder.calls == ["draw"] * 4 + ["inputs", "terms"] * 2 + ["after_backward", "after_step 0 taken 1"]
    assert set(result.terms) == {"loss", "mse", "vb", "recorded"}
    # "loss" is the objective's terms plus 2 x the recorded term (batch means, float64 sums of float32).
    expected = result.terms["mse"] + result.terms["vb"] + 2 * result.terms["recorded"]
    assert float(result.terms["loss"]) == pytest.approx(float(expected), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the dispersive loss
# ----------------------------------------------------------------------------------------------


def dispersive_reference(hidden: np.ndarray, group: int, temperature: float) -> np.ndarray:
    """Wang & He's L_disp in float64, written from the definition: log of the mean over all B² ordered
    pairs (i = j included) of exp(−‖z_i − z_j‖² / (d τ)), per group of consecutive samples."""
    z = hidden.reshape(len(hidden), -1).astype(np.float64)
    out = np.empty(len(z))
    for start in range(0, len(z), group):
        members = z[start:start + group]
        squared = ((members[:, None, :] - members[None, :, :]) ** 2).sum(-1)
        out[start:start + group] = np.log(np.exp(-squared / (z.shape[1] * temperature)).mean())
    return out


@pytest.mark.parametrize("group, temperature", [(4, 1.0), (8, 0.5), (2, 2.0)])
def test_the_dispersive_loss_is_its_definition(group, temperature):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 5, 6, generator=generator)  # (N, T, D): 30 features a sample
    value = dispersive_loss(hidden, group, temperature)
    expected = dispersive_reference(hidden.numpy(), group, temperature)
    # float32 squared distances (sums of 30 squares of O(1)) and their exp / logsumexp carry a few u =
    # 2^-24 relative each; the loss is O(0.1-1) and its inputs O(1): 1e-5 absolute is > 10x that.
    assert np.allclose(value.double().numpy(), expected, rtol=0, atol=1e-5)
    # Each sample carries its group's value; the groups differ.
    assert torch.equal(value.reshape(-1, group), value.reshape(-1, group)[:, :1].expand(-1, group))
    # Identical samples give the largest value, log 1 = 0.
    assert torch.allclose(dispersive_loss(torch.ones(4, 3), 4, temperature), torch.zeros(4))


def test_the_dispersive_loss_is_the_same_for_any_split_into_micro_batches():
    # Bitwise: each group is computed by the same operations on the same (B, d) tensor, whatever else
    # the call holds; splitting the batch at a group boundary cannot change a bit.
    hidden = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(1))
    whole = dispersive_loss(hidden, 4, 1.0)
    assert torch.equal(whole, torch.cat([dispersive_loss(hidden[:4], 4, 1.0), dispersive_loss(hidden[4:], 4, 1.0)]))


def test_the_dispersive_gradient_is_its_derivative():
    hidden = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: dispersive_loss(h, 2, 0.7).double(), (hidden,))


def test_dispersion_pushes_representations_apart():
    # Minimising L_disp alone spreads the samples: the mean pairwise distance grows.
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)).mul(0.1).requires_grad_()
    optimizer = torch.optim.SGD([z], lr=50.0)
    before = torch.pdist(z.detach()).mean()
    for _ in range(20):
        optimizer.zero_grad()
        dispersive_loss(z, 8, 1.0).mean().backward()
        optimizer.step()
    assert torch.pdist(z.detach()).mean() > 2 * before


@pytest.mark.parametrize("fields, message", [
    (dict(disperse=0.5, disperse_depth=3), "--disperse-depth 3 is not a block of DiT-T/2 (blocks 1..2)"),
    (dict(disperse=0.5, route=0.5, route_blocks="1:2"), "--disperse-depth 2 lies in the routed span"),
    (dict(disperse=0.5, disperse_group=3), "--disperse-group 3 does not divide the per-process micro-batch 16"),
    (dict(disperse=-1.0), "--disperse must be >= 0, got -1.0"),
    (dict(disperse=0.5, disperse_temperature=0.0), "--disperse-temperature must be > 0, got 0.0"),
])
def test_bad_dispersive_settings_are_one_line_and_write_nothing(tmp_path, fields, message):
    with pytest.raises(UserError) as error:
        train(tiny_config(tmp_path / "runs", **fields))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_the_flag_alone_disperses_at_the_released_weight():
    import argparse

    from fastdit.cli.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--disperse", "--data-path", "digits"])).dispersion.disperse == 0.25
    assert config_from_args(parser.parse_args(["--data-path", "digits"])).dispersion.disperse == 0.0


def test_the_dispersive_loss_alone_trains_on_two_processes_as_on_one(tmp_path):
    result = torchrun(tmp_path, *TINY, *X_PRED, *DISPERSE, "--max-steps", "4", "--ckpt-every", "4", "--device", "cpu",
                      "--results-dir", str(tmp_path / "two"), "--micro-batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order
    try:
        one = train(tiny_config(tmp_path / "one", max_steps=4, ckpt_every=4, **X_PRED_FIELDS, **DISPERSE_FIELDS))
    finally:
        torch.set_num_threads(threads)
    two_state, one_state = final_state(tmp_path / "two" / one.run_dir.name), final_state(one.run_dir)
    for key in one_state["model"]:
        if key == "x_embedder.proj.bias":
            # A shift common to every token of every sample leaves every distance unchanged: the dispersive
            # loss's gradient to this bias is 0 but for rounding, and at step 1 the objective's is exactly 0
            # too (the zero-initialised final layer). Adam divides that rounding by its own size and moves
            # each entry by up to lr in a direction the summation order picks, so on 1 and 2 processes most
            # entries differ; only Adam's bound on the total move (twice its most in 4 steps) holds for them.
            assert ((two_state["model"][key] - one_state["model"][key]).abs() <= 2 * 4 * 1e-3 * 0.1 / 0.001**0.5).all()
            continue
        assert_same_after_adam(two_state["model"][key], one_state["model"][key], key, steps=4)


def test_a_dispersive_run_logs_its_term_and_says_so(tmp_path, capsys):
    result = train(tiny_config(tmp_path, max_steps=2, ckpt_every=2, disperse=0.5, disperse_group=8))
    assert "dispersive loss at block 2 (weight 0.5, τ 1, groups of 8)" in capsys.readouterr().out
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # L_disp is the log of a mean of numbers in (0, 1]: at most 0, at least −ln(B²/B) = −ln 8 for groups of 8.
    assert -math.log(8) <= record["disperse"] <= 0
    assert record["loss"] == pytest.approx(record["mse"] + record["vb"] + 0.5 * record["disperse"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# every method at once: REPA (inside the routed span), routing, post-hoc EMAs, dispersive loss
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder

    torch.manual_seed(1)
    return str(save_digit_encoder(DigitTokens(), tmp_path_factory.mktemp("encoder") / "tiny.ts"))


def all_methods(encoder):
    """Flags and config fields of a depth-3 model with every method: blocks[1:2] routed, REPA aligning
    block 2 (inside the span: its kept tokens), the dispersive loss on the last block (outside it)."""
    flags = ["--depth", "3", "--repa", encoder, "--repa-depth", "2", "--repa-projector-dim", "32", "--route", "0.5",
             "--route-blocks", "1:2", "--posthoc-ema", "--posthoc-every", "2", "--disperse", "0.5",
             "--disperse-group", "4"]
    fields = dict(depth=3, repa=encoder, repa_depth=2, repa_projector_dim=32, route=0.5, route_blocks="1:2",
                  posthoc_ema=True, posthoc_every=2, disperse=0.5, disperse_group=4)
    return flags, fields


def test_every_method_at_once_resumes_bit_exactly_after_sigkill(tiny_encoder, tmp_path, capsys):
    flags, fields = all_methods(tiny_encoder)
    reference = train(tiny_config(tmp_path / "reference", max_steps=8, ckpt_every=2, **fields))
    started = capsys.readouterr().out
    for text in ("REPA with", "token routing: blocks[1:2]", "post-hoc EMAs", "dispersive loss at block 3"):
        assert text in started
    command = [sys.executable, "-m", "fastdit", "train", *TINY, *flags, "--max-steps", "8", "--ckpt-every", "2",
               "--results-dir", str(tmp_path / "killed")]
    run_dir = tmp_path / "killed" / reference.run_dir.name
    kill_once_checkpointed(command, run_dir, step=4, last=8)
    subprocess.run(command, check=True, capture_output=True)
    resumed, uninterrupted = final_state(run_dir), final_state(reference.run_dir)
    assert resumed.keys() == uninterrupted.keys() >= {"model", "ema", "optimizer", "alignment", "posthoc_ema"}
    for part in ("model", "ema"):
        assert_same_tensors(resumed[part], uninterrupted[part])
    for a, b in zip(resumed["posthoc_ema"], uninterrupted["posthoc_ema"]):
        assert_same_tensors(a, b)
    assert_same_tensors(resumed["alignment"]["projector"], uninterrupted["alignment"]["projector"])
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert_same_tensors(a, b)
    metrics = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"repa", "disperse", "mse", "vb"} <= metrics[-1].keys()
    snapshots = sorted(p.name for p in (run_dir / "posthoc_ema").iterdir())
    assert snapshots == sorted(p.name for p in (reference.run_dir / "posthoc_ema").iterdir())


def test_every_method_at_once_trains_on_two_processes_as_on_one(tiny_encoder, tmp_path):
    flags, fields = all_methods(tiny_encoder)
    result = torchrun(tmp_path, *TINY, *flags, "--max-steps", "4", "--ckpt-every", "4", "--device", "cpu",
                      "--results-dir", str(tmp_path / "two"), "--micro-batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order
    try:
        one = train(tiny_config(tmp_path / "one", max_steps=4, ckpt_every=4, **fields))
    finally:
        torch.set_num_threads(threads)
    two_state, one_state = final_state(tmp_path / "two" / one.run_dir.name), final_state(one.run_dir)
    # As test_train_distributed.py: the processes' gradients differ from one process's by summation order
    # only (the dispersive groups of 4 lie inside each process's micro-batch of 4, the same 4 samples).
    for key in one_state["model"]:
        assert_same_after_adam(two_state["model"][key], one_state["model"][key], key, steps=4)
        assert_same_after_adam(two_state["ema"][key], one_state["ema"][key], key, steps=4)
    for key, value in one_state["alignment"]["projector"].items():
        assert_same_after_adam(two_state["alignment"]["projector"][key], value, key, steps=4)
    for two, one_ in zip(two_state["posthoc_ema"], one_state["posthoc_ema"]):
        for key in one_:
            assert_same_after_adam(two[key], one_[key], key, steps=4)


def test_every_method_at_once_trains_under_fsdp_as_under_ddp(tiny_encoder, tmp_path):
    from test_fsdp import losses, torchrun as fsdp_torchrun

    flags, _ = all_methods(tiny_encoder)
    steps = ["--max-steps", "4", "--ckpt-every", "4", "--grad-clip", "0.05"]
    fsdp_torchrun(tmp_path, *flags, *steps, "--results-dir", str(tmp_path / "ddp"))
    fsdp_torchrun(tmp_path, *flags, *steps, "--results-dir", str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    # As test_fsdp.py: the runs differ in how two processes' gradients are summed (a few u per element),
    # which Adam turns into a few u of each step; 1e-5 relative bounds it on the losses.
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    ddp_state, fsdp_state = final_state(ddp), final_state(fsdp)
    for part in ("model", "ema"):
        for key, value in ddp_state[part].items():
            assert_same_after_adam(fsdp_state[part][key], value, key, steps=4)
    for two, one in zip(fsdp_state["posthoc_ema"], ddp_state["posthoc_ema"]):
        for key in one:
            assert_same_after_adam(two[key], one[key], key, steps=4)
    for key, value in ddp_state["alignment"]["projector"].items():
        assert_same_after_adam(fsdp_state["alignment"]["projector"][key], value, key, steps=4)


def test_train_help_lists_every_methods_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--ema-decay", "--posthoc-ema", "--repa", "--route", "--disperse", "--disperse-depth",
                 "--disperse-temperature", "--disperse-group"):
        assert flag in text


# ----------------------------------------------------------------------------------------------
# a step reads nothing on the host (no sync on a GPU)
# ----------------------------------------------------------------------------------------------

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@pytest.mark.parametrize("fields", [
    {}, dict(objective="flow", time_sampling="logit-normal"), dict(objective="x-pred"),
    dict(depth=3, route=0.5, route_blocks="1:2", disperse=0.5, disperse_group=4, posthoc_ema=True, grad_clip=0.5),
    dict(skip_nonfinite=2, warmup_steps=3),
], ids=["ddpm", "flow", "x-pred", "methods", "skip-nonfinite"])
def test_a_training_step_reads_no_tensor_on_the_host(fields, monkeypatch, tiny_encoder):
    """On a GPU every read of a device tensor's value on the host (`item`, `bool`, `float`, ...) waits
    for the queued work: one a step stalls the pipeline. The step's decisions (skip a non-finite step,
    clip) stay on the device; the loop reads the step's outcome a step later. Counted here by patching
    the reads during whole steps. (MeanFlow's JVP picks its r != t rows with `nonzero`, a read of its
    own: it is not among these objectives.)"""
    from fastdit.distributed import DistInfo
    from fastdit.model_info import LatentInfo
    from fastdit.models import build_model
    from fastdit.train.loop import build_training_state
    from fastdit.train.step import train_step
    from fastdit.train.training_data import TrainingData

    if "route" in fields:
        fields = {**fields, "repa": tiny_encoder, "repa_depth": 2, "repa_projector_dim": 32}
    config = tiny_config("unused", **fields)
    torch.manual_seed(0)
    depth = fields.get("depth", 2)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=depth, hidden_size=64,
                        num_heads=2)
    data = TrainingData(dataset=None, latent_shape=(1, 8, 8), latent_info=LatentInfo(kind="pixels", vae=None),
                        class_names=None, device=torch.device("cpu"))
    state = build_training_state(config, DistInfo(0, 1, 0, torch.device("cpu")), model, data)
    batch = (torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,)))
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    results = []
    for step in range(2):
        state.position.step = step
        results.append(train_step(state, batch, config.build_objective()))
    monkeypatch.undo()
    assert reads == []
    assert not any(bool(result.skipped) for result in results)
