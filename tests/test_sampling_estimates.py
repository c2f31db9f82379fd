"""The per-step hook `on_estimate(x̂)` (what the app's previews and Stop button use): it sees an estimate
after every model call, it leaves the samples bitwise as they are without it, and its last estimate is
the sample itself."""

import numpy as np
import pytest
import torch

from fastdit.latents import PixelSpace
from fastdit.models import build_model
from fastdit.objectives import build_objective
from fastdit.sampling import ModelView, SamplingOptions, generate, get_sampler, samplers_for

OBJECTIVES = {"ddpm": build_objective("ddpm"), "flow": build_objective("flow")}
CASES = [(name, sampler) for name in OBJECTIVES for sampler in samplers_for(OBJECTIVES[name])]
NUM_STEPS = 6


def tiny_model(learn_sigma: bool):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=10, learn_sigma=learn_sigma).eval()
    for p in model.parameters():  # away from the all-zero adaLN-Zero init, so outputs are not trivial
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_every_sampler_of_both_processes_is_covered():
    # Not vacuous: both processes, and the ancestral, grid, ODE and SDE families among them.
    assert {"ddpm", "ddim", "dpm++2m"} <= {s for o, s in CASES if o == "ddpm"}
    assert {"euler", "heun", "sde-euler", "sde-heun", "ddim", "dpm++2m"} <= {s for o, s in CASES if o == "flow"}


@pytest.mark.parametrize("objective_name, sampler", CASES)
def test_the_hook_sees_every_call_and_changes_no_bit(objective_name, sampler):
    if sampler == "dopri5":
        pytest.importorskip("torchdiffeq", reason="the dopri5 sampler needs torchdiffeq")
    objective = OBJECTIVES[objective_name]
    model = tiny_model(learn_sigma=objective_name == "ddpm")
    options = SamplingOptions(sampler=sampler, num_steps=NUM_STEPS, cfg_scale=2.0)
    labels, pixels = [0, 3, 9], PixelSpace(3)
    plain = generate(model, pixels, labels, options=options, objective=objective, seed=4)
    estimates = []
    watched = generate(model, pixels, labels, options=options, objective=objective, seed=4,
                       on_estimate=lambda x0: estimates.append(x0.clone()))
    assert np.array_equal(plain, watched)  # the same arithmetic in the same order: identical bytes
    assert len(estimates) >= NUM_STEPS - 1 and all(e.shape == (3, 3, 8, 8) for e in estimates)
    assert not torch.equal(estimates[0], estimates[-1])  # the estimate moves as the run goes on
    if sampler in ("ddpm", "ddim", "dpm++2m", "euler"):
        # These samplers' last step lands on their last x̂ (DDIM and DPM-Solver++ return x̂0 on the step
        # onto data; DDPM's step at t = 0 is its posterior mean with weight 1 on x̂0 and no noise; Euler's
        # last step is x + (1 − t) v). The pixels agree to rounding: to_uint8 truncates 127.5 x + 128, so
        # a float32 difference of a few ulps can move a value across an integer: at most 1 level.
        last = PixelSpace(3).decode(estimates[-1])
        last = torch.clamp(127.5 * last + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(last.astype(int) - plain.astype(int)).max() <= 1


def test_the_hook_stops_a_run_by_raising():
    class Stop(Exception):
        pass

    calls = []

    def stop_on_third(x0):
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    options = SamplingOptions(sampler="ddim", num_steps=NUM_STEPS, cfg_scale=1.0)
    with pytest.raises(Stop):
        generate(tiny_model(False), PixelSpace(3), [1], options=options, objective=OBJECTIVES["flow"], on_estimate=stop_on_third)
    assert len(calls) == 3  # no model call after the hook raised


def test_meanflow_reports_its_one_step_sample():
    """MeanFlow's one-step sample x + (1 − 0) u is also its estimate (the same sum, within a few ulps)."""
    objective = build_objective("meanflow")
    sampler = get_sampler("meanflow", objective)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    network = lambda x, t, y, gap: 0.5 * x + gap.view(-1, 1, 1, 1)  # any function of the inputs
    estimates = []
    view = ModelView(objective, network, torch.zeros(2, dtype=torch.long), learn_sigma=False, on_estimate=estimates.append)
    out = sampler.run(view, noise, num_steps=1, noise_fn=None, progress=False)
    plain = sampler.run(ModelView(objective, network, torch.zeros(2, dtype=torch.long), learn_sigma=False), noise,
                        num_steps=1, noise_fn=None, progress=False)
    assert len(estimates) == 1 and torch.equal(out, plain)
    assert torch.allclose(estimates[0], out, rtol=0, atol=4 * torch.finfo(torch.float32).eps * out.abs().max().item())
