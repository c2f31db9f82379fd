"""Guidance arithmetic, samplers end to end, reproducibility and the VAE decode path."""

import re

import numpy as np
import pytest
import torch

from fastdit.diffusion import create_diffusion
from fastdit.errors import UserError
from fastdit.latents import PixelSpace, VAELatentSpace
from fastdit.models import build_model
from fastdit.objectives import build_objective
from fastdit.sampling import (
    SAMPLERS, ClassifierFreeGuidance, ModelView, SamplingOptions, ddim, dpm_solver_pp_2m, gaussian_grid,
    generate as generate_with, guide, guided_model, sample_latents,
)
from fastdit.sampling.noise import PerImageNoise
from conftest import tiny_vae_config
from official_steps import ddim_step


DDPM = build_objective("ddpm")


def generate(*args, **kwargs):
    """`generate` for the DDPM models of this file (the process is a required argument)."""
    return generate_with(*args, objective=DDPM, **kwargs)


def tiny_model(**overrides):
    torch.manual_seed(0)
    fields = dict(input_size=8, in_channels=4, depth=1, num_classes=10)
    fields.update(overrides)
    model = build_model("DiT-T/2", **fields).eval()
    for p in model.parameters():  # leave the all-zero adaLN-Zero init so outputs are not trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_guide_arithmetic():
    cond = torch.tensor([[[[2.0]], [[4.0]], [[6.0]], [[8.0]]]])
    uncond = torch.tensor([[[[1.0]], [[1.0]], [[1.0]], [[1.0]]]])
    out = guide(cond, uncond, scale=3.0, guided_channels=4)
    assert out.flatten().tolist() == [4.0, 10.0, 16.0, 22.0]
    official = guide(cond, uncond, scale=3.0, guided_channels=3)
    assert official.flatten().tolist() == [4.0, 10.0, 16.0, 8.0]


def test_guidance_wrapper_uses_null_class_and_keeps_variance_of_cond():
    calls = []

    def fake_model(x, t, y):
        calls.append(y.tolist())
        return torch.cat([y.float().reshape(-1, 1, 1, 1).expand(-1, 2, 1, 1), -y.float().reshape(-1, 1, 1, 1).expand(-1, 2, 1, 1)], 1)

    wrapper = ClassifierFreeGuidance(fake_model, scale=2.0, null_class=7, in_channels=2)
    out = wrapper(torch.zeros(2, 2, 1, 1), torch.tensor([5, 5]), torch.tensor([1, 3]))
    assert calls == [[1, 3, 7, 7]]
    # guided = 7 + 2 * (y - 7); the variance channels (last 2) come from the conditional half
    assert out[:, 0].flatten().tolist() == [-5.0, -1.0]
    assert out[:, 2].flatten().tolist() == [-1.0, -3.0]
    with pytest.raises(UserError, match="cfg scale 0.5 < 1"):
        ClassifierFreeGuidance(fake_model, scale=0.5, null_class=7, in_channels=2)


def official_forward_with_cfg(network, x, t, y, scale, null_class):
    """The official guided call, written from DiT's and SiT's models.py: run [x, x] with labels
    [y, null], guide `model_out[:, :3]` of the network's output and keep the rest of the conditional
    half. SiT's network returns the velocity half only, so on the flow path `network` is that."""
    out = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = eps.chunk(2)
    return torch.cat([uncond_eps + scale * (cond_eps - uncond_eps), rest[: len(x)]], dim=1)


@pytest.mark.parametrize("objective_name", ["ddpm", "flow"])
@pytest.mark.parametrize("channels", [1, 3, 4, 8])
@pytest.mark.parametrize("learn_sigma", [True, False], ids=["learned-sigma", "fixed-sigma"])
def test_official_guidance_is_the_official_rule_for_any_channel_count(objective_name, channels, learn_sigma):
    # Issue #18, item 2: --official-guidance on a 1-channel model stopped with "guided_channels must
    # be in [1, 1], got 3". It means the official `model_out[:, :3]` of the whole output, any C.
    objective = build_objective(objective_name)
    model = tiny_model(in_channels=channels, learn_sigma=learn_sigma)
    scale, null = 3.0, model.config.null_class
    options = SamplingOptions(sampler="ddpm" if objective_name == "ddpm" else "euler", num_steps=3, cfg_scale=scale,
                              guided_channels=3)
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(channels))
    y = torch.tensor([2, 7])
    t = torch.tensor([600.0, 600.0]) if objective_name == "ddpm" else torch.tensor([0.4, 0.4])
    with torch.no_grad():
        if objective_name == "ddpm":  # DiT guides the whole output (ε, then the variance channels)
            ours = guided_model(model, objective, options)(x, t, y)
            official = official_forward_with_cfg(model, x, t, y, scale, null)
        else:  # SiT guides its network's output, the velocity half: what the flow view hands the samplers
            ours = ModelView(objective, guided_model(model, objective, options), y, learn_sigma=learn_sigma).velocity(x, t, y)
            official = official_forward_with_cfg(lambda *a: model(*a)[:, :channels], x, t, y, scale, null)
    assert ours.shape == official.shape
    # The same forward of the same doubled batch and the same two-operation formula: at most a
    # rounding of each of u + s(c − u)'s three operations apart, u·(1 + 2s)·max|out| with u = 2^-24.
    bound = 2**-24 * (1 + 2 * scale) * official.abs().max().item()
    assert (ours - official).abs().max().item() <= bound
    # Guidance changed what it should (not vacuous): the first three channels of the whole output.
    with torch.no_grad():
        doubled = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    plain = doubled[: len(x), : official.shape[1]]  # the conditional half, from the same batch as the guided call
    guided_channels = min(3, official.shape[1])
    assert not torch.allclose(official[:, :guided_channels], plain[:, :guided_channels], atol=1e-4)
    assert torch.equal(official[:, guided_channels:], plain[:, guided_channels:])

    # And the sampler run through `generate`'s path starts and ends like one driven by the official call.
    labels = torch.tensor([2, 7])
    latents = sample_latents(model, labels, objective=objective, options=options, noise=PerImageNoise(5, [0, 1]))
    def velocity_half(x, t, y):  # SiT's network: the velocity channels only
        return model(x, t, y)[:, :channels]

    def reference_fn(x, t, y):
        if objective_name == "ddpm":
            return official_forward_with_cfg(model, x, t, y, scale, null)
        return official_forward_with_cfg(velocity_half, x, t, y, scale, null)  # the flow view keeps it whole

    view = ModelView(objective, reference_fn, labels, learn_sigma=learn_sigma and objective_name == "ddpm")
    noise = PerImageNoise(5, [0, 1])
    start = noise.draw((channels, 8, 8))
    reference = SAMPLERS[options.sampler].run(view, start, num_steps=3, noise_fn=noise, progress=False)
    # Three steps of a tiny model from the same noise, each output within the bound above: the states
    # agree to a few roundings of their scale (1e-5 of max|x| leaves room for three steps' growth).
    assert (latents - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


def test_generate_samples_a_model_in_train_mode_in_eval_mode_and_restores_it():
    # Issue #18, item 5.7: a DiT in train mode drops labels at random, so one seed gave other images.
    model = tiny_model(in_channels=3, class_dropout_prob=0.5).train()
    options = SamplingOptions(sampler="ddim", num_steps=4, cfg_scale=1.0)
    labels = list(range(10))
    first = generate(model, PixelSpace(3), labels, options=options, seed=3)
    second = generate(model, PixelSpace(3), labels, options=options, seed=3)
    assert np.array_equal(first, second)
    assert all(module.training for module in model.modules())  # every submodule's mode restored
    model.eval()
    assert np.array_equal(generate(model, PixelSpace(3), labels, options=options, seed=3), first)
    assert not model.training


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_samplers_run_and_are_reproducible(sampler):
    model = tiny_model(in_channels=3)
    options = SamplingOptions(sampler=sampler, num_steps=10, cfg_scale=2.0)
    labels = [0, 3, 9]
    a = generate(model, PixelSpace(3), labels, options=options, seed=1)
    b = generate(model, PixelSpace(3), labels, options=options, seed=1)
    c = generate(model, PixelSpace(3), labels, options=options, seed=2)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_noise_of_an_image_is_the_same_in_any_batch_and_on_any_cpu():
    whole = PerImageNoise(7, [0, 1, 2, 3])
    part = PerImageNoise(7, [2, 3])
    for _ in range(3):  # x_T, then two steps' fresh noise: each image's stream, in order
        assert torch.equal(whole.draw((3, 4, 4))[2:], part.draw((3, 4, 4)))
    # numpy's PCG64 ziggurat normals are computed without vector kernels: these are the values on every
    # CPU (torch.randn's float32 normals differ in the last bits between AVX-512, AVX2 and ARM).
    first = PerImageNoise(0, [0]).draw((4,))[0]
    assert first.tolist() == pytest.approx([-1.0318708, -0.2879528, 1.0221118, 0.9864890], abs=1e-7)


def test_images_are_bit_identical_for_the_same_batch():
    # The promise (README, "Reproducibility"): same seed, same batch composition, same machine -> same bytes.
    model = tiny_model(in_channels=3)
    options = SamplingOptions(sampler="ddpm", num_steps=5, cfg_scale=1.5)
    first = generate(model, PixelSpace(3), [3, 4], options=options, seed=7, indices=[2, 3])
    again = generate(model, PixelSpace(3), [3, 4], options=options, seed=7, indices=[2, 3])
    assert np.array_equal(first, again)


def test_images_in_another_batch_differ_at_most_by_rounding():
    # Another batch shape may round the model's GEMMs differently (a GEMM over 2 rows and over 4 rows is
    # allowed to sum in another order), so the bytes may differ; what may not differ is the image. The
    # model calls agree to ~1e-5 relative (the tolerance the official fixtures hold across CPUs), far
    # below the 1/127.5 of one uint8 level: so no pixel may move by more than one level.
    model = tiny_model(in_channels=3)
    options = SamplingOptions(sampler="ddpm", num_steps=5, cfg_scale=1.5)
    whole = generate(model, PixelSpace(3), [1, 2, 3, 4], options=options, seed=7)
    part = generate(model, PixelSpace(3), [3, 4], options=options, seed=7, indices=[2, 3])
    other_image = generate(model, PixelSpace(3), [3, 4], options=options, seed=7, indices=[5, 6])
    levels = np.abs(whole[2:].astype(int) - part.astype(int))
    assert levels.max() <= 1
    assert np.abs(other_image.astype(int) - part.astype(int)).max() > 1  # the check can tell images apart


def test_ddim_eta0_is_deterministic_given_start():
    model = tiny_model()
    diffusion = create_diffusion("5")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    drawn = []
    one = ddim(gaussian_grid(diffusion, model, y), x_T, noise_fn=lambda x: drawn.append(1) or torch.randn_like(x))
    two = ddim(gaussian_grid(diffusion, model, y), x_T)
    assert torch.equal(one, two) and not drawn  # eta = 0 draws no noise at all


def test_grid_ddim_matches_the_official_ddim_step():
    # The grid sampler (α, σ as float64 scalars) against the official step (coefficients gathered in
    # float64, cast to float32) run over the same respaced process: the same arithmetic up to float32
    # rounding of the coefficients (~1e-7 relative per step; 5 steps of an O(1) map: 1e-5 of the scale).
    model = tiny_model()
    diffusion = create_diffusion("5")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    official = x_T
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((2,), i, dtype=torch.long)
        official = ddim_step(diffusion, model, official, t, model_kwargs={"y": y}, eta=0.0, noise=torch.zeros_like(x_T))["sample"]
    grid = ddim(gaussian_grid(diffusion, model, y), x_T)
    assert (grid - official).abs().max() <= 1e-5 * official.abs().max()


def test_dpm_solver_converges_to_ddim_ode_with_many_steps():
    """Both integrate the same probability-flow ODE; with many steps their answers agree."""
    model = tiny_model()
    y = torch.tensor([1, 2])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = ddim(gaussian_grid(create_diffusion("250"), model, y), x_T)
    coarse = dpm_solver_pp_2m(gaussian_grid(create_diffusion("10"), model, y), x_T)
    fine = dpm_solver_pp_2m(gaussian_grid(create_diffusion("50"), model, y), x_T)
    scale = reference.abs().mean()
    assert (fine - reference).abs().mean() < (coarse - reference).abs().mean()
    assert (fine - reference).abs().mean() < 0.01 * scale


def test_generate_through_tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = VAELatentSpace(AutoencoderKL(**tiny_vae_config()), name="tiny")
    model = tiny_model(input_size=4)
    images = generate(model, vae, [0, 1], options=SamplingOptions(num_steps=3, cfg_scale=4.0), seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_bad_sampling_arguments():
    model = tiny_model(in_channels=3)
    with pytest.raises(UserError, match="class label 10 is outside \\[0, 10\\)"):
        generate(model, PixelSpace(3), [1, 10], options=SamplingOptions(num_steps=2))
    with pytest.raises(UserError, match="cfg scale 0.5"):
        generate(model, PixelSpace(3), [1], options=SamplingOptions(num_steps=2, cfg_scale=0.5))
    with pytest.raises(UserError, match="sampler 'euler' does not fit this ddpm model; use one of: ddpm, ddim, dpm"):
        generate(model, PixelSpace(3), [1], options=SamplingOptions(sampler="euler", num_steps=2))
    with pytest.raises(UserError, match="eta is an option of the ddim sampler only"):
        generate(model, PixelSpace(3), [1], options=SamplingOptions(sampler="ddpm", num_steps=2, eta=0.5))
    with pytest.raises(UserError, match="time shift applies to flow models only"):
        generate(model, PixelSpace(3), [1], options=SamplingOptions(num_steps=2, time_shift=3.0))
    with pytest.raises(UserError, match=r"guidance interval \(500, 100\) must lie in .* \[0, 999\] with LOW <= HIGH"):
        generate(model, PixelSpace(3), [1], options=SamplingOptions(num_steps=2, guidance_interval=(500, 100)))
    with pytest.raises(UserError, match=r"guidance interval \(0, 2\) must lie in this flow model's time range \[0, 1\]"):
        generate_with(model, PixelSpace(3), [1], options=SamplingOptions(num_steps=2, guidance_interval=(0, 2)),
                      objective=build_objective("flow"))
    unconditional = tiny_model(in_channels=3, class_dropout_prob=0.0, num_classes=1)
    with pytest.raises(UserError, match="no null class"):
        generate(unconditional, PixelSpace(3), [0], options=SamplingOptions(num_steps=2, cfg_scale=2.0))
    assert generate(unconditional, PixelSpace(3), [0], options=SamplingOptions(num_steps=2, cfg_scale=1.0)).shape == (1, 8, 8, 3)


# ----------------------------------------------------------------------------------------------
# hostile use (#18 item 5): work per call is bounded, non-finite output is never an image,
# labels are integers
# ----------------------------------------------------------------------------------------------


def test_generate_samples_in_fixed_size_batches(monkeypatch):
    import importlib

    generate_module = importlib.import_module("fastdit.sampling.generate")  # the package re-exports the function
    real, sizes = generate_module.sample_latents, []

    def counting(model, labels, **kwargs):
        sizes.append(len(labels))
        return real(model, labels, **kwargs)

    monkeypatch.setattr(generate_module, "sample_latents", counting)
    model = tiny_model(in_channels=3)
    options = SamplingOptions(sampler="ddpm", num_steps=4, cfg_scale=1.5)
    labels = [1, 2, 3, 4, 5]
    batched = generate(model, PixelSpace(3), labels, options=options, seed=7, batch_size=2)
    assert sizes == [2, 2, 1]  # memory is that of two images, whatever the number of labels
    sizes.clear()
    whole = generate(model, PixelSpace(3), labels, options=options, seed=7, batch_size=5)
    assert sizes == [5] and batched.shape == whole.shape == (5, 8, 8, 3)
    # The same images: each is a function of (seed, index). Batches of another shape may round the GEMMs
    # differently (~1e-5 relative at most, the tolerance the official fixtures hold across CPUs), far
    # below one uint8 level (1/127.5 of [-1, 1]), so a pixel can cross at most one rounding boundary.
    assert np.abs(batched.astype(int) - whole.astype(int)).max() <= 1
    # Where the batch is the same (images 2 and 3 alone), the code makes it bit for bit the same.
    assert np.array_equal(batched[2:4], generate(model, PixelSpace(3), labels[2:4], options=options, seed=7,
                                                 indices=[2, 3], batch_size=2))
    other_seed = generate(model, PixelSpace(3), labels, options=options, seed=8, batch_size=2)
    assert np.abs(other_seed.astype(int) - whole.astype(int)).max() > 1  # the comparison can tell images apart
    with pytest.raises(UserError, match="batch size must be a positive integer, got 0"):
        generate(model, PixelSpace(3), labels, options=options, batch_size=0)


def test_a_model_that_overflows_is_an_error_not_black_images():
    """Finite weights (they pass `load_model`'s check) whose output overflows float32 on the first step."""
    model = tiny_model(in_channels=3)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(3e38)
    with pytest.raises(UserError, match=r"non-finite latents \(NaN or inf\) for 2 of 2 image\(s\) \(indices 4, 5\); "
                                        r"nothing is written"):
        generate(model, PixelSpace(3), [1, 2], options=SamplingOptions(num_steps=3, cfg_scale=1.0), seed=0,
                 indices=[4, 5])


def test_every_decoded_batch_is_checked():
    class OneNaNImage(PixelSpace):
        """Decodes the second image of every batch to NaN, as a VAE in fp16 may overflow."""

        def decode(self, latents):
            latents = latents.clone()
            latents[1:2] = float("nan")
            return latents

    model = tiny_model(in_channels=3)
    options = SamplingOptions(num_steps=2, cfg_scale=1.0)
    with pytest.raises(UserError, match=r"non-finite decoded images \(NaN or inf\) for 1 of 2 image\(s\) \(indices 1\)"):
        generate(model, OneNaNImage(3), [1, 2, 3], options=options, batch_size=2)


@pytest.mark.parametrize("scale", [1e30, 101.0])
def test_guidance_scales_that_overflow_are_refused(scale):
    model = tiny_model(in_channels=3)
    with pytest.raises(UserError, match=re.escape(f"cfg scale {scale:g}") + " is above 100: published scales are 1.5 to about 10"):
        generate(model, PixelSpace(3), [1], options=SamplingOptions(num_steps=2, cfg_scale=scale))


def test_time_shifts_outside_their_range_are_refused_and_its_ends_sample():
    flow = build_objective("flow")
    model = tiny_model(in_channels=3, learn_sigma=False)
    for shift in (1e-300, 0.009, 101.0, 1e300):
        with pytest.raises(UserError, match=r"time shift must be in \[0.01, 100\] \(1: no shift\)"):
            generate_with(model, PixelSpace(3), [1], options=SamplingOptions(num_steps=3, time_shift=shift), objective=flow)
    for sampler in ("euler", "sde-euler"):  # the ends of the range and the largest scale still give images
        for shift in (0.01, 100.0):
            options = SamplingOptions(sampler=sampler, num_steps=8, time_shift=shift, cfg_scale=100.0)
            assert generate_with(model, PixelSpace(3), [1], options=options, objective=flow).shape == (1, 8, 8, 3)


@pytest.mark.parametrize("labels, message", [
    ([1.5], r"class labels must be integers, got float32 values \(first: 1.5\)"),
    (np.array([2.0, 3.0]), r"class labels must be integers, got float64 values \(first: 2.0\)"),
    (torch.tensor([True]), r"class labels must be integers, got bool values \(first: True\)"),
    ([1 + 2j], r"class labels must be integers, got complex64 values"),
    (["cat"], r"class labels must be integers, got \['cat'\]"),
    ([], r"no class labels given; pass at least one label from 0 to 9"),
])
def test_labels_that_are_not_integers_or_none_are_refused(labels, message):
    from fastdit.sampling import check_labels

    with pytest.raises(UserError, match=message):
        check_labels(labels, 10)
    assert check_labels(np.array([3, 4], dtype=np.int32), 10).tolist() == [3, 4]  # integer arrays are fine
