"""The draws of a training step: per global sample, so any process count and batch split see the same numbers."""

import math

import pytest
import torch

from fastdit.objectives import build_objective
from fastdit.train.step_noise import draw_step

SHAPE = (4, 2, 2)
GLOBAL_BATCH = 8
OBJECTIVES = {"ddpm": build_objective("ddpm"), "flow": build_objective("flow", time_sampling="logit-normal"),
              "x-pred": build_objective("x-pred", time_sampling="logit-normal", logit_normal_mean=-0.8),
              "meanflow": build_objective("meanflow")}


def draws_of(rank=0, world=1, *, seed=0, step=3, global_batch=GLOBAL_BATCH, objective="ddpm", dropout_prob=0.5,
             device="cpu"):
    return draw_step(
        seed, step, global_batch=global_batch, rank=rank, local_batch=global_batch // world, shape=SHAPE,
        objective=OBJECTIVES[objective], dropout_prob=dropout_prob, with_latent_noise=True, device=torch.device(device),
    )


def fields(draws):
    return {**draws.objective, "drop_labels": draws.drop_labels, "latent_noise": draws.latent_noise}


def assert_same(a, b):
    for name, value in fields(a).items():
        assert torch.equal(value, fields(b)[name]), name


# Bitwise equality is justified here: sample g is always drawn by its own generator, seeded by
# (seed, step, g), through the same calls with the same per-sample shapes, whatever the rank or world
# size; slicing and concatenation only copy. No reduction or batch-shaped kernel is involved.
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_draws_its_slice_of_the_one_process_draws(objective, world):
    whole = draws_of(objective=objective)
    local = GLOBAL_BATCH // world
    for rank in range(world):
        assert_same(draws_of(rank, world, objective=objective), whole.micro(rank * local, (rank + 1) * local))


def test_a_samples_draws_do_not_depend_on_the_global_batch():
    # A per-step generator made sample g depend on how many samples were drawn before it.
    assert_same(draws_of(global_batch=4), draws_of(global_batch=8).micro(0, 4))
    assert_same(draws_of(rank=1, world=2, global_batch=4), draws_of(global_batch=8).micro(2, 4))


def test_steps_seeds_and_samples_differ():
    base = draws_of()
    for other in (draws_of(step=4), draws_of(seed=1)):
        assert not torch.equal(other.objective["noise"], base.objective["noise"])
        assert not torch.equal(other.latent_noise, base.latent_noise)
        assert not torch.equal(other.objective["t"], base.objective["t"])
    # Every sample has a generator of its own: no two samples of a step share their noise.
    flat = base.objective["noise"].flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == GLOBAL_BATCH
    assert not torch.equal(base.objective["noise"], base.latent_noise)


def test_dropout_probability_decides_the_drops():
    assert not draws_of(dropout_prob=0.0).drop_labels.any()
    assert draws_of(dropout_prob=1.0).drop_labels.all()


def check_device_and_shapes(device):
    draws = draws_of(1, 2, device=device)
    for name, value in fields(draws).items():
        assert value.device.type == torch.device(device).type, name
    t, noise = draws.objective["t"], draws.objective["noise"]
    assert t.shape == draws.drop_labels.shape == (GLOBAL_BATCH // 2,)
    assert noise.shape == draws.latent_noise.shape == (GLOBAL_BATCH // 2, *SHAPE)
    assert t.dtype == torch.int64 and draws.drop_labels.dtype == torch.bool


def test_draws_are_made_on_the_cpu():
    check_device_and_shapes("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_draws_are_made_on_cuda_and_split_alike(objective):
    check_device_and_shapes("cuda")
    whole = draws_of(objective=objective, device="cuda")
    assert_same(draws_of(1, 2, objective=objective, device="cuda"), whole.micro(GLOBAL_BATCH // 2, GLOBAL_BATCH))


def test_a_rank_never_draws_the_global_batch(monkeypatch):
    # The cost of a step's draws: each rank draws one sample at a time and only its own samples, so no
    # randn call is bigger than one sample and there is one noise and one latent-noise call per local sample.
    sizes = []
    randn = torch.randn

    def spy(*args, **kwargs):
        value = randn(*args, **kwargs)
        sizes.append(value.numel())
        return value

    monkeypatch.setattr(torch, "randn", spy)
    draws_of(rank=1, world=4, objective="flow")  # logit-normal t: randn also draws the times
    per_sample = math.prod(SHAPE)
    assert max(sizes) == per_sample
    assert sizes.count(per_sample) == 2 * (GLOBAL_BATCH // 4)
