"""Token routing (TREAD): which blocks see which tokens, positions under RoPE and absolute embeddings,
the draws, gradients, every objective, REPA inside the span, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from fastdit.cli import main
from fastdit.distributed import DistInfo
from fastdit.errors import UserError
from fastdit.model_info import LatentInfo
from fastdit.models import build_model
from fastdit.models.routing import TokenRoute
from fastdit.objectives import build_objective
from fastdit.seeding import TRAIN_STEP, seeded_generator
from fastdit.train.loop import build_training_state, train
from fastdit.train.extensions.routing import RouteSettings, TokenRouting, kept_tokens, resolve_span, route_settings
from fastdit.train.step import train_step
from fastdit.train.step_noise import draw_step
from fastdit.train.training_data import TrainingData
from test_train import TINY, assert_same_tensors, final_state, tiny_config

CPU = torch.device("cpu")


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """adaLN-Zero starts every block as the identity; random weights make every block do something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model


def tiny_dit(depth=5, rope=False, **more):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=depth, hidden_size=64,
                        num_heads=2, rope=rope, **more)
    return randomised(model).eval()


def inputs(n=3):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 8, 8, generator=generator), torch.tensor([10, 400, 900][:n]),
            torch.tensor([1, 2, 3][:n]))


def random_route(n, num_tokens, kept, start, end, seed=2):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_tokens, generator=generator)[:kept].sort().values for _ in range(n)]
    return TokenRoute(torch.stack(rows), start, end)


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


def test_each_block_sees_the_tokens_of_its_place_in_the_span():
    model = tiny_dit(depth=5)
    seen = []
    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: seen.append((index, args[0].shape[1])))
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y, route=random_route(3, 16, 8, 1, 4))
    assert seen == [(0, 16), (1, 8), (2, 8), (3, 8), (4, 16)]
    seen.clear()
    with torch.no_grad():
        model(x, t, y)  # no route: every block sees every token
    assert seen == [(k, 16) for k in range(5)]


@pytest.mark.parametrize("start, end", [(1, 4), (2, 5), (0, 5)], ids=["middle", "to-the-end", "every-block"])
def test_routed_tokens_skip_exactly_the_span(start, end):
    """The routed tokens leave the sequence before block `start` and come back unchanged after block
    end - 1; the kept ones are changed by the span's blocks."""
    model = tiny_dit(depth=5)
    route = random_route(3, 16, 8, start, end)
    captured = {}
    if start > 0:  # what block start - 1 hands on (block start's own input is already the kept tokens)
        model.blocks[start - 1].register_forward_hook(lambda m, args, out: captured.__setitem__("before", out))
    after = model.blocks[end] if end < len(model.blocks) else model.final_layer
    after.register_forward_pre_hook(lambda m, args: captured.__setitem__("after", args[0]))
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y, route=route)
        embedded = model.x_embedder(x) + model.pos_embed  # what block 0 receives
    before, rejoined = captured.get("before", embedded), captured["after"]
    assert before.shape == rejoined.shape == (3, 16, 64)  # the whole sequence before and after the span
    routed = torch.ones(3, 16, dtype=torch.bool).scatter(1, route.kept, False)
    # Copied, not recomputed: bit for bit.
    assert torch.equal(rejoined[routed], before[routed])
    changed = (rejoined[~routed] - before[~routed]).abs().amax(dim=-1)
    assert (changed > 1e-3).all()  # every kept token went through the blocks


@pytest.mark.parametrize("rope", [False, True], ids=["absolute", "rope"])
def test_positions_follow_the_tokens(rope):
    """A route that keeps every token, shuffled, through every block must compute the unrouted output:
    attention is permutation-equivariant once each token carries its own position (the absolute table
    added before routing, and its own RoPE rows). Had the RoPE rows not followed their tokens, the
    outputs would differ by O(1). Tolerance: the shuffled attention sums its keys in another order,
    float32 rounding (2^-24 relative per add) over 16 keys and 5 blocks stays far below 1e-5."""
    model = tiny_dit(depth=5, rope=rope)
    x, t, y = inputs()
    generator = torch.Generator().manual_seed(3)
    shuffled = torch.stack([torch.randperm(16, generator=generator) for _ in range(3)])
    with torch.no_grad():
        plain = model(x, t, y)
        routed = model(x, t, y, route=TokenRoute(shuffled, 0, 5))
    assert torch.allclose(routed, plain, rtol=1e-5, atol=1e-5)
    if rope:  # the check has teeth: rows in sequence order (row j for the j-th kept token) differ
        order = shuffled[:1].expand(3, -1)
        inverse = order[0].argsort()  # table[inverse][order] = table: each token rotated by its slot's row
        tables = model.rope_cos, model.rope_sin
        model.rope_cos, model.rope_sin = tables[0][inverse], tables[1][inverse]
        with torch.no_grad():
            wrong = model(x, t, y, route=TokenRoute(order, 0, 5))
        model.rope_cos, model.rope_sin = tables
        assert (wrong - plain).abs().max() > 1e-2


def test_a_route_keeping_every_token_in_order_is_the_plain_forward_bit_for_bit():
    model = tiny_dit(depth=4, rope=True)
    x, t, y = inputs()
    with torch.no_grad():
        plain = model(x, t, y)
        routed = model(x, t, y, route=TokenRoute(torch.arange(16).expand(3, -1), 1, 3))
    assert torch.equal(routed, plain)


def test_routing_adds_no_parameter_and_leaves_the_state_dict_official():
    plain = build_model("DiT-T/2", input_size=8, num_classes=10)
    routed = build_model("DiT-T/2", input_size=8, num_classes=10)
    assert plain.state_dict().keys() == routed.state_dict().keys()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    routed(x, t, y, route=TokenRoute(torch.tensor([[0, 5], [3, 9]]), 0, 2))  # runs; nothing was created
    assert plain.state_dict().keys() == routed.state_dict().keys()


# ----------------------------------------------------------------------------------------------
# settings and draws
# ----------------------------------------------------------------------------------------------


def test_the_span_and_the_kept_count():
    assert resolve_span("2:-1", 28) == (2, 27)  # TREAD's: blocks 2 .. 26 of XL's 28
    assert resolve_span("2:-1", 12) == (2, 11)
    assert resolve_span("0:4", 4) == (0, 4)
    assert kept_tokens(256, 0.5) == 128 and kept_tokens(16, 0.25) == 12 and kept_tokens(4, 0.99) == 1
    assert route_settings(0.0, "2:-1", 2, 16) is None  # off: no span is resolved, a 2-block model is fine
    assert route_settings(0.01, "0:1", 2, 16) is None  # routes no whole token: today's step


def test_rate_0_draws_what_the_step_drew_before_routing():
    """Sample g's draws come from its own generator in a fixed order; routing draws last, so with rate 0
    (no route draw) the draws are today's: the DDPM timestep, noise and dropout decision as drawn by hand."""
    objective = build_objective("ddpm")
    kwargs = dict(global_batch=4, rank=0, local_batch=4, shape=(1, 8, 8), objective=objective, dropout_prob=0.1,
                  with_latent_noise=False, device=CPU)
    draws = draw_step(7, 3, **kwargs)
    for g in range(4):
        generator = seeded_generator(TRAIN_STEP, 7, 3, g)
        t = torch.randint(0, 1000, (1,), generator=generator)
        noise = torch.randn((1, 1, 8, 8), generator=generator)
        drop = torch.rand(1, generator=generator) < 0.1
        assert torch.equal(draws.objective["t"][g:g + 1], t) and torch.equal(draws.objective["noise"][g:g + 1], noise)
        assert torch.equal(draws.drop_labels[g:g + 1], drop)
    assert draws.extra.get("route_kept") is None
    routed = draw_step(7, 3, extra_draws=[TokenRouting(RouteSettings(1, 2, 16, 8)).draw], **kwargs)
    # The route is drawn after the rest: every other draw is unchanged.
    assert torch.equal(routed.objective["noise"], draws.objective["noise"])
    assert torch.equal(routed.drop_labels, draws.drop_labels)
    kept = routed.extra["route_kept"]
    assert kept.shape == (4, 8) and all(len(set(row.tolist())) == 8 for row in kept)
    assert (kept.diff(dim=1) > 0).all() and not all(torch.equal(kept[0], row) for row in kept[1:])
    # Sample g's subset does not depend on the process it lands on.
    second_half = draw_step(7, 3, **{**kwargs, "rank": 1, "local_batch": 2},
                            extra_draws=[TokenRouting(RouteSettings(1, 2, 16, 8)).draw])
    assert torch.equal(second_half.extra["route_kept"], kept[2:])


def test_rate_0_trains_bitwise_as_before(tmp_path):
    """`--route 0` with any span is the step without routing: the same weights bit for bit."""
    plain = train(tiny_config(tmp_path / "plain", max_steps=2, ckpt_every=2))
    off = train(tiny_config(tmp_path / "off", max_steps=2, ckpt_every=2, route=0.0, route_blocks="0:1"))
    routed = train(tiny_config(tmp_path / "on", max_steps=2, ckpt_every=2, route=0.5, route_blocks="0:1"))
    a, b, c = (final_state(r.run_dir)["model"] for r in (plain, off, routed))
    assert_same_tensors(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and routing does change the step


# ----------------------------------------------------------------------------------------------
# the training step
# ----------------------------------------------------------------------------------------------


def training_state(config, depth=3, rope=False, **network):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=depth, hidden_size=64,
                        num_heads=2, rope=rope, **network)
    data = TrainingData(dataset=None, latent_shape=(1, 8, 8), latent_info=LatentInfo(kind="pixels", vae=None),
                        class_names=None, device=CPU)
    return model, build_training_state(config, DistInfo(0, 1, 0, CPU), model, data)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "x-pred", "meanflow"])
def test_gradient_reaches_every_parameter_over_a_few_steps(objective):
    config = tiny_config("unused", depth=3, objective=objective, route=0.5, route_blocks="1:3")
    model, state = training_state(config, depth=3, **config.build_objective().network())
    before = {name: p.clone() for name, p in model.named_parameters()}
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))
    for step in range(3):
        state.position.step = step
        terms = train_step(state, (x, y), config.build_objective()).terms
        assert torch.isfinite(terms["loss"])
    assert 8 in seen  # the trained forward was routed: 8 of the 16 tokens in the span
    unchanged = [n for n, p in model.named_parameters() if n != "pos_embed" and torch.equal(p, before[n])]
    assert unchanged == []


def test_meanflows_target_runs_on_every_token_and_its_trained_forward_on_the_kept():
    config = tiny_config("unused", depth=3, objective="meanflow", meanflow_ratio=1.0, route=0.5, route_blocks="1:3")
    model, state = training_state(config, depth=3, **config.build_objective().network())
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))
    train_step(state, (x, y), config.build_objective())
    # With every r != t the JVP runs first (no-grad, all 16 tokens), then the trained forward (routed: 8).
    assert seen[0] == 16 and seen[-1] == 8


def test_repa_inside_the_span_aligns_the_kept_tokens(tmp_path):
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder

    torch.manual_seed(1)
    encoder = str(save_digit_encoder(DigitTokens(), tmp_path / "tiny.ts"))
    for depth, expected in ((2, 8), (1, 16)):  # block 2 (1-based) lies in blocks[1:3]; block 1 does not
        config = tiny_config("unused", depth=3, repa=encoder, repa_depth=depth, repa_projector_dim=32,
                             route=0.5, route_blocks="1:3")
        model, state = training_state(config, depth=3)
        shapes = []
        alignment = state.extension("repa")
        original = alignment.loss

        def recorded(hidden, targets, original=original):
            shapes.append((hidden.shape, targets.shape))
            return original(hidden, targets)

        alignment.loss = recorded
        x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))
        terms = train_step(state, (x, y), config.build_objective()).terms
        assert torch.isfinite(terms["repa"])
        (hidden, targets), = shapes
        assert hidden[:2] == targets[:2] == (16, expected)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--route", "1"], "--route must be in [0, 1), got 1.0"),
    (["--route", "-0.1"], "--route must be in [0, 1), got -0.1"),
    (["--route", "0.5", "--route-blocks", "0:3"], "--route-blocks 0:3 is not a span of this model's 2 blocks"),
    (["--route", "0.5"], "--route-blocks 2:-1 is not a span of this model's 2 blocks"),
    (["--route-blocks", "2-5"], "--route-blocks '2-5' is not START:END"),
])
def test_bad_routing_settings_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *TINY, "--results-dir", str(tmp_path / "runs"), "--max-steps", "1", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_the_flag_alone_routes_at_the_papers_rate():
    from fastdit.cli.train import add_arguments, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--route", "--data-path", "digits"]))
    assert (config.routing.route, config.routing.route_blocks) == (0.5, "2:-1")
    assert config_from_args(parser.parse_args(["--data-path", "digits"])).routing.route == 0.0


def test_routing_defines_the_run(tmp_path):
    train(tiny_config(tmp_path, max_steps=2, ckpt_every=2))
    with pytest.raises(UserError, match="route"):
        train(tiny_config(tmp_path, max_steps=4, ckpt_every=2, route=0.5, route_blocks="1:2"))
