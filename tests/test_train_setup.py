"""Training-side fast paths (issue #9): activation checkpointing policies and regional torch.compile.

Each policy and each compiled model must train the same function as the plain eager model (same loss,
same gradients) while doing what it says: recomputing the chosen modules, compiling block by block.
"""

import argparse
import json
import shutil

import pytest
import torch
import torch._inductor.config
import torch._dynamo

from fastdit.cli.train import add_arguments, config_from_args
from fastdit.distributed import DistInfo
from fastdit.errors import UserError
from fastdit.models import LIGHTNINGDIT_BLOCKS, build_model
from fastdit.train.config import TrainConfig
from fastdit.train.setup import checkpoint_blocks, prepare_model

POLICIES = ["off", "blocks", "every-2", "mlp"]
DEPTH = 3
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_model(**blocks):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, depth=DEPTH, num_classes=4, class_dropout_prob=0.0, learn_sigma=False,
                        **blocks)
    for p in model.parameters():  # break adaLN-Zero so that every parameter gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    return model


def batch():
    torch.manual_seed(1)
    return torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])


def loss_and_grads(model, runnable=None):
    model.zero_grad()
    loss = (runnable or model)(*batch()).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(reference, other, ulps):
    """Loss and every gradient within `ulps` float32 ulps (u = 6e-8) of the largest term's scale."""
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    u = 2.0 ** -24
    torch.testing.assert_close(loss_b, loss_a, rtol=ulps * u, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=ulps * u * scale, msg=name)


def recomputed_modules(model):
    return [name for name, module in model.named_modules() if type(module).__name__.startswith("Recomputed")]


def saved_activation_bytes(model, policy):
    """Bytes autograd keeps for backward outside checkpointed regions (inside one, checkpoint's own
    hooks take over and keep nothing); parameters (and their transposed views) are not activations."""
    checkpoint_blocks(model, policy)
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*batch()).square().mean().backward()
    return sum(saved)


@pytest.mark.parametrize("blocks", [{}, LIGHTNINGDIT_BLOCKS], ids=["official", "lightningdit"])  # mlp: GELU, SwiGLU
@pytest.mark.parametrize("policy", POLICIES[1:])
def test_every_checkpointing_policy_trains_the_same_function(policy, blocks):
    model = tiny_model(**blocks)
    with torch.no_grad():
        out_plain = model(*batch())
    plain = loss_and_grads(model)
    checkpoint_blocks(model, policy)
    with torch.no_grad():
        assert torch.equal(model(*batch()), out_plain)  # the forward pass is the same computation
    checkpointed = loss_and_grads(model)
    # Recomputation repeats the same kernels on the same shapes; only the order in which autograd sums
    # the contributions to shared inputs (c feeds every block) may differ: a few ulps of the largest
    # term. 16 ulps (1e-6 relative) leaves room for that and none for a different computation.
    assert_same_training(plain, checkpointed, ulps=16)
    assert checkpointed[1].keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in checkpointed[1].items():  # and elementwise, as these tests have always asked
        torch.testing.assert_close(grad, plain[1][name], rtol=1e-6, atol=1e-7, msg=name)
    assert list(model.state_dict()) == list(tiny_model(**blocks).state_dict())  # official names


def test_each_policy_recomputes_what_it_says():
    expected = {
        "off": [],
        "blocks": [f"blocks.{i}" for i in range(DEPTH)],
        "every-1": [f"blocks.{i}" for i in range(DEPTH)],
        "every-2": ["blocks.0", "blocks.2"],
        "every-3": ["blocks.0"],
        "mlp": [f"blocks.{i}.mlp" for i in range(DEPTH)],
    }
    for policy, names in expected.items():
        model = tiny_model()
        checkpoint_blocks(model, policy)
        assert recomputed_modules(model) == names, policy
    saved = {policy: saved_activation_bytes(tiny_model(), policy) for policy in POLICIES}
    assert saved["blocks"] < saved["every-2"] < saved["off"]
    assert saved["mlp"] < saved["off"]


@pytest.mark.parametrize("policy", ["on", "every-0", "every-x", "every-", "Blocks", "attention"])
def test_an_unknown_policy_is_a_user_error(tmp_path, policy):
    with pytest.raises(UserError, match=f"{policy!r}.*off, blocks, mlp, every-K"):
        checkpoint_blocks(tiny_model(), policy)
    with pytest.raises(UserError, match=f"{policy!r}.*off, blocks, mlp, every-K"):
        TrainConfig.create(data_path="digits", model="DiT-T/2", image_size=8, gradient_checkpointing=policy).validate()


def test_configs_of_older_runs_map_the_on_off_switch_to_a_policy():
    for recorded, policy in ((True, "blocks"), (False, "off")):
        data = {**TrainConfig.create(data_path="digits").to_flat(), "gradient_checkpointing": recorded}
        config = TrainConfig.from_dict(json.loads(json.dumps(data)))
        assert config.run.gradient_checkpointing == policy
        config.validate()


def test_the_flag_alone_means_every_block():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, policy in (([], "off"), (["--grad-checkpointing"], "blocks"), (["--gradient-checkpointing"], "blocks"),
                         (["--grad-checkpointing", "mlp"], "mlp"), (["--gradient-checkpointing", "every-2"], "every-2"),
                         (["--grad-checkpointing", "off"], "off"), (["--no-gradient-checkpointing"], "off")):
        args = parser.parse_args([*argv, "--compile"])  # a flag after the bare one is not taken as its value
        config = config_from_args(args)
        assert (config.run.gradient_checkpointing, config.run.compile) == (policy, True), argv


def test_an_older_run_folder_resumes(tmp_path):
    from test_train import tiny_config
    from fastdit.train.loop import train

    first = train(tiny_config(tmp_path, max_steps=2, gradient_checkpointing="blocks"))
    # As written before the policies (a bool) and before the config's sections (one flat dict).
    flat = {**TrainConfig.from_dict(json.loads((first.run_dir / "config.json").read_text())).to_flat(),
            "gradient_checkpointing": True}
    for path in first.run_dir.glob("checkpoints/*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["config"] = flat
        torch.save(state, path)
    config_path = first.run_dir / "config.json"
    config_path.write_text(json.dumps(flat))
    resumed = train(tiny_config(tmp_path, max_steps=4, gradient_checkpointing="mlp"))
    assert (resumed.run_dir, resumed.step) == (first.run_dir, 4)
    assert json.loads(config_path.read_text())["run"]["gradient_checkpointing"] == "mlp"


def compiled(policy, backend):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    runnable = prepare_model(model, dist=CPU, gradient_checkpointing=policy, compile_model=True, compile_backend=backend)
    return model, runnable


@pytest.mark.parametrize("policy", POLICIES)
def test_regional_compile_trains_the_same_function_and_compiles_one_block_graph(policy):
    eager = loss_and_grads(tiny_model())
    model, runnable = compiled(policy, "aot_eager")
    first, second = loss_and_grads(model, runnable), loss_and_grads(model, runnable)
    # aot_eager runs the decomposed ops (layer norm, GELU as their primitive parts) in a different
    # summation order: each op a few ulps, compounding over ~10 ops per block and 3 blocks, forward and
    # backward; 256 ulps (1.5e-5 relative) bounds that, far below what a wrong graph would change.
    assert_same_training(eager, first, ulps=256)
    assert_same_training(eager, second, ulps=256)
    assert runnable is model and model._compiled_call_impl is None  # regional: the blocks, not the model
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == list(tiny_model().state_dict())
    # All blocks share one graph (two under every-2: checkpointed and plain blocks differ), checkpoint
    # regions included: a graph break or a per-block recompile would show here.
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == (2 if policy == "every-2" else 1)
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on a CPU")
def test_inductor_compiled_checkpointed_blocks_train_the_same_function(tmp_path, monkeypatch):
    # A cache of its own: torch 2.13's inductor caches do not tell kernels built for one vector width from
    # another, so after a run with other ATEN_CPU_CAPABILITY kernels they hand back code that fails to
    # compile or computes NaN (seen here under =default and =avx2 after a native run).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    eager = loss_and_grads(tiny_model())
    model, runnable = compiled("blocks", "inductor")
    # Inductor fuses ops into its own kernels (its own summation order and exp/tanh implementations,
    # vectorised to the machine's width): a few ulps per fused op; 1024 ulps (6e-5 relative) bounds it.
    assert_same_training(eager, loss_and_grads(model, runnable), ulps=1024)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# The trained forward of every objective and every training method runs compiled: a counting backend
# counts the compiled-graph calls of each step (one per block of the trained forward). MeanFlow's first
# block calls happen inside torch.func.jvp, where dynamo declines a frame for the whole run: its target
# passes run eagerly so that the trained forward compiles (it counted 0 before).
COMPILED_RUNS = {
    "ddpm": {}, "flow": dict(objective="flow"), "x-pred": dict(objective="x-pred"),
    "meanflow": dict(objective="meanflow", meanflow_omega=2.0, meanflow_kappa=0.25, meanflow_ratio=1.0),
    "improved-meanflow": dict(objective="meanflow", meanflow_v_loss=True, meanflow_guidance_input=True),
    "routing": dict(objective="meanflow", route=0.5, route_blocks="1:2"),
    "dispersive": dict(disperse=0.5, disperse_group=8), "posthoc": dict(posthoc_ema=True),
}


@pytest.mark.parametrize("name", sorted(COMPILED_RUNS))
def test_every_objective_and_method_trains_its_forward_compiled(name, monkeypatch):
    from fastdit import compile as regional
    from fastdit.distributed import DistInfo
    from fastdit.model_info import LatentInfo
    from fastdit.models import build_model
    from fastdit.train import setup
    from fastdit.train.loop import build_training_state
    from fastdit.train.step import train_step
    from fastdit.train.training_data import TrainingData
    from test_train import tiny_config

    torch._dynamo.reset()
    monkeypatch.setattr(setup, "compile_blocks", lambda model, backend: regional.compile_blocks(model, "eager"))
    config = tiny_config("unused", depth=3, compile=True, micro_batch_size=8, **COMPILED_RUNS[name])
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=3, hidden_size=64, num_heads=2,
                        **config.build_objective().network())
    data = TrainingData(dataset=None, latent_shape=(1, 8, 8), latent_info=LatentInfo(kind="pixels", vae=None),
                        class_names=None, device=CPU.device)
    state = build_training_state(config, DistInfo(0, 1, 0, CPU.device), model, data)
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))
    for step in range(2):
        before = model.compile_stats.calls
        state.position.step = step
        train_step(state, (x, y), config.build_objective())
        assert model.compile_stats.calls - before == 3 * 2, f"step {step}: 3 blocks x 2 micro-batches"
    assert model.compile_stats.graphs >= 1


def test_a_run_says_what_its_first_step_ran_compiled(tmp_path, capsys, monkeypatch):
    from fastdit import compile as regional
    from fastdit.train import setup
    from fastdit.train.loop import train
    from test_train import tiny_config

    torch._dynamo.reset()
    monkeypatch.setattr(setup, "compile_blocks", lambda model, backend: regional.compile_blocks(model, "eager"))
    train(tiny_config(tmp_path, max_steps=1, ckpt_every=1, compile=True, objective="meanflow"))
    assert "torch.compile: 1 block graph(s) compiled; 2 block calls of the first step ran compiled code" in \
        capsys.readouterr().out
