"""The FID Inception itself against golden outputs of an independent port of the ADM graph.

`tests/fixtures/inception/` (see its README) holds the outputs of torch-fidelity's port of the
TF 2015-12-05 graph under "recipe" weights: per state-dict key, numpy PCG64 seeded with
crc32(key). We rebuild those weights here, check them against the fixture's checksums, load them
through our loader (in the fixture's layout, `num_batches_tracked` included) and compare pool_3, the
unbiased logits and the sFID features with the float64 reference run.
"""

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdit.evaluate import load_inception
from fastdit.evaluate.inception import InceptionV3

GOLDEN = Path(__file__).parent / "fixtures" / "inception" / "inception_golden.pt"
IMAGE_SETS = ("img64", "img256", "img299", "img_nonsquare")
# Our output name -> the fixture's name for the same tensor.
OUTPUT_NAMES = {"pool": "pool_3", "logits": "logits_unbiased", "spatial": "spatial_mixed6d_branch1x1_first7_nhwc"}
# The README: the fixture's own float32 and float64 runs differ by <= ~5e-6 of max|ref| (sFID
# features; ~5e-7 for pool_3 and logits), i.e. float32 round-off accumulated over ~100 layers. Any
# float32 implementation of the same graph lands within that order; 1e-4 leaves a 20x margin for a
# different summation order (another CPU kernel path), while a wrong pooling mode, block order,
# resize or normalisation moves the outputs by 1e-2 or more of max|ref|.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def recipe_weight(key: str, shape: list[int]) -> torch.Tensor:
    """The README's recipe: float64 draws from PCG64(crc32(key)), cast to float32 (the same on every CPU)."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.int64)
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode("utf-8"))))
    if key.endswith("conv.weight"):
        values = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    elif key.endswith(("bn.weight", "bn.running_var")):
        values = 0.5 + rng.random(shape)
    elif key.endswith(("bn.bias", "bn.running_mean")):
        values = 0.1 * rng.standard_normal(shape)
    elif key == "fc.weight":
        values = rng.standard_normal(shape) * np.sqrt(1 / 2048)
    elif key == "fc.bias":
        values = rng.standard_normal(shape)
    else:
        raise KeyError(f"the recipe does not cover {key!r}")
    return torch.from_numpy(values.astype(np.float32))


@pytest.fixture(scope="module")
def recipe_state(golden):
    return {key: recipe_weight(key, shape) for key, shape in golden["layout"].items()}


@pytest.fixture(scope="module")
def model(recipe_state, tmp_path_factory):
    # Through the file loader, as a user's weights file would go.
    path = tmp_path_factory.mktemp("inception") / "recipe.pth"
    torch.save(recipe_state, path)
    return load_inception(path, progress=False)


def test_recipe_weights_match_the_fixture_checksums(golden, recipe_state):
    assert set(recipe_state) == set(golden["checksums"])
    for key, weight in recipe_state.items():
        expected_sum, expected_abs_sum = golden["checksums"][key]
        values = weight.double()
        # float64 sums of the same float32 values: only the summation order differs (~1e-16 relative).
        scale = max(float(expected_abs_sum), 1.0)
        assert abs(float(values.sum()) - expected_sum) <= 1e-9 * scale, key
        assert abs(float(values.abs().sum()) - expected_abs_sum) <= 1e-9 * scale, key


def test_the_fixture_layout_covers_our_network(golden):
    ours = {k: list(v.shape) for k, v in InceptionV3().state_dict().items()}
    assert ours == {k: list(shape) for k, shape in golden["layout"].items()}


def run_against_golden(model, golden, image_set):
    """Largest |ours - reference| / max|reference| per output, against the float64 reference run."""
    reference = golden["outputs"][f"{image_set}/float64"]
    with torch.inference_mode():
        outputs = model(golden["images"][image_set])
    errors = {}
    for ours, theirs in OUTPUT_NAMES.items():
        got, expected = getattr(outputs, ours).double(), reference[theirs]
        assert got.shape == expected.shape
        errors[ours] = float((got - expected).abs().max() / expected.abs().max())
    return errors


@pytest.mark.parametrize("image_set", IMAGE_SETS)
def test_outputs_match_the_adm_graph(model, golden, image_set):
    errors = run_against_golden(model, golden, image_set)
    assert all(error <= RELATIVE_TOLERANCE for error in errors.values()), errors


def test_padding_counted_in_the_average_pools_is_caught(model, golden, monkeypatch):
    # torchvision's (non-TF) average pool divides border windows by 9: the tolerance above must see it.
    def torchvision_avg_pool(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=True)

    monkeypatch.setattr("fastdit.evaluate.inception._tf_avg_pool", torchvision_avg_pool)
    errors = run_against_golden(model, golden, "img64")
    assert all(error > 10 * RELATIVE_TOLERANCE for error in errors.values()), errors
