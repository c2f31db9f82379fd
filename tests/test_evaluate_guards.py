"""Guards that make an evaluation number trustworthy.

* The matrix square root inside every Fréchet distance (FID, sFID, FD-DINOv2, FDr6's six) holds on the
  ill-conditioned covariances that break `scipy.linalg.sqrtm` (LightningDiT #97: 20.65 where 5-8 was
  expected, from a BLAS under which sqrtm returned garbage), checked against a known answer.
* The features of a folder do not depend on the evaluation batch size beyond float rounding (RAE #44).
* The FID that `train --eval-every` logs is the FID of `sample-ddp` + `evaluate` on the same checkpoint and
  settings, to the last printed digit (RAE #70: online and offline evaluations ~4 points apart).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from fastdit.cli import main
from fastdit.evaluate import InceptionFeatureExtractor, statistics_for_path
from fastdit.evaluate.encoder_features import EncoderFeatures, torch_bicubic
from fastdit.evaluate.inception import random_inception_state_dict
from fastdit.evaluate.metrics import frechet_distance, trace_sqrt_product
from fastdit.encoders import load_encoder
from tiny_encoders import save_tiny


# --- the matrix square root -----------------------------------------------------------------------------


def ill_conditioned_pair(dim, log_condition, scale, seed, m_log_condition=None):
    """(sigma1, sigma2, tr sqrt(sigma1 sigma2)) with a known answer.

    sigma1 = Q1 diag(w) Q1^T and M = Q2 diag(w') Q2^T have eigenvalues spread over 10^log_condition,
    times `scale`. With sigma2 = M sigma1 M, sigma1 sigma2 = (sigma1 M)^2, and sigma1 M has the (>= 0)
    eigenvalues of sigma1^(1/2) M sigma1^(1/2): so tr sqrt(sigma1 sigma2) = tr(sigma1 M), a plain sum
    that float64 gives to ~1e-15, whatever the conditioning.
    """
    rng = np.random.default_rng(seed)

    def spd(top, log_cond):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        s = (q * (np.logspace(0, -log_cond, dim) * top)) @ q.T
        return (s + s.T) / 2

    sigma1, m = spd(scale, log_condition), spd(1.0, log_condition if m_log_condition is None else m_log_condition)
    sigma2 = m @ sigma1 @ m
    return sigma1, (sigma2 + sigma2.T) / 2, float(np.sum(sigma1 * m))


def adm_trace_sqrt(sigma1, sigma2):
    """ADM's evaluator (and pytorch-fid's) route: scipy's sqrtm of the product, with its guards (eps on the
    diagonals when not finite, and a ValueError when the diagonal's imaginary part exceeds 1e-3)."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


# condition numbers 1e12 (the range of real Inception / DINOv2 covariances) to 1e20 (past float64: the
# smallest eigenvalues are round-off), at the scale of pool_3 features and 1e4 times larger.
@pytest.mark.parametrize("log_condition, scale", [(12, 1e2), (16, 1e2), (20, 1e2), (12, 1e8), (16, 1e8)])
def test_trace_sqrt_product_holds_where_scipy_sqrtm_breaks(log_condition, scale):
    sigma1, sigma2, exact = ill_conditioned_pair(64, log_condition, scale, seed=log_condition)
    ours = trace_sqrt_product(sigma1, sigma2)
    # Tolerance: the eigenvalues of F^T sigma2 F are found with absolute error ~ eps * lambda_max (eigh is
    # backward stable), and sqrt turns an error e on a tiny lambda into ~sqrt(e): at most
    # d * sqrt(eps * lambda_max) <= d * sqrt(eps) * tr sqrt(...) in all, i.e. 64 * 1.5e-8 ~ 1e-6 relative.
    # Observed: 1e-10 to 1e-8.
    assert ours == pytest.approx(exact, rel=1e-6)
    try:
        theirs = adm_trace_sqrt(sigma1, sigma2)
    except ValueError:  # the "Imaginary component" error ADM / pytorch-fid stop with
        return
    assert abs(theirs - exact) >= abs(ours - exact)  # scipy's Schur route is no closer than ours


def test_frechet_distance_of_ill_conditioned_full_rank_covariances_is_the_known_value():
    # sigma1's condition 1e6, M's 1e2, so sigma2's <= 1e10: both full rank above numpy's matrix_rank
    # tolerance (lambda_max * d * eps ~ 1e-12 here), so no ADM offset is added and the answer is known.
    sigma1, sigma2, exact_trace = ill_conditioned_pair(48, 6, 1e2, seed=1, m_log_condition=2)
    mu1, mu2 = np.zeros(48), np.full(48, 0.1)
    expected = 48 * 0.01 + np.trace(sigma1) + np.trace(sigma2) - 2 * exact_trace
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    # Every Fréchet distance of the suite is this function: FID, sFID, FD-DINOv2 and FDr6's six spaces.
    from fastdit.evaluate import fdr, statistics

    assert fdr.frechet_distance is frechet_distance and statistics.frechet_distance is frechet_distance


# --- batch-size invariance ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), path)
    return path


def write_folder(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def test_the_statistics_of_a_folder_do_not_depend_on_the_batch_size(tmp_path, inception_weights):
    folder = write_folder(tmp_path / "images", np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), np.uint8))
    stats = {
        batch: statistics_for_path(folder, InceptionFeatureExtractor(inception_weights, batch_size=batch),
                                   progress=False)
        for batch in (1, 3, 8)  # one at a time, 3 + 3 + 1, all at once
    }
    first = stats[1]
    for batch, other in stats.items():
        # Per-image features may differ in the last float32 bits between batch shapes (the convolution
        # kernels block the batch differently): ~1e-7 relative on activations of order 1, so 1e-5 absolute
        # on features and 1e-5 relative on their float64 moments.
        np.testing.assert_allclose(other.pr_features, first.pr_features, rtol=1e-5, atol=1e-5, err_msg=str(batch))
        np.testing.assert_allclose(other.mu, first.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.sigma, first.sigma, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(other.sigma_s, first.sigma_s, rtol=1e-5, atol=1e-7)
        assert other.inception_score == pytest.approx(first.inception_score, rel=1e-5)
        # ... and the distance between the same images evaluated at two batch sizes is zero.
        assert frechet_distance(other.mu, other.sigma, first.mu, first.sigma) < 1e-6


def test_encoder_features_do_not_depend_on_the_batch_size(tmp_path):
    encoder = load_encoder(f"dinov2-vitl14={save_tiny('dinov2', tmp_path / 'dinov2')}", resolution=28)
    images = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), np.uint8)

    def features(batch):
        prepare = lambda x: torch_bicubic(x, 28, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist())  # noqa: E731
        return EncoderFeatures(encoder, prepare, batch_size=batch)(images)

    reference = features(1)
    for batch in (3, 8):  # same tolerance argument as for Inception
        torch.testing.assert_close(features(batch), reference, rtol=1e-5, atol=1e-5)


# --- online = offline -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_fid_logged_during_training_is_the_fid_of_sample_ddp_then_evaluate(tmp_path, inception_weights, capsys):
    from fastdit.data import DigitsDataset
    from fastdit.train import TrainConfig, train

    real = DigitsDataset("heldout").images[:6]  # (6, 1, 8, 8) in [-1, 1] -> uint8 RGB, an ADM batch
    pixels = ((real + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=pixels.numpy())
    seed, samples, steps, batch = 3, 5, 2, 4  # 5 images in batches of 4: a short last batch on both sides
    config = TrainConfig.create(
        data_path="digits", model="DiT-T/2", image_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=2,
        global_batch_size=16, lr=1e-3, ema_decay=0.9, num_workers=0, log_every=1, progress=False,
        tensorboard=False, results_dir=str(tmp_path / "runs"), max_steps=2, ckpt_every=2, global_seed=seed,
        eval_every=2, eval_samples=samples, eval_sampling_steps=steps, eval_cfg_scale=1.5,
        eval_ref=str(reference), inception_weights=str(inception_weights), eval_batch_size=batch)
    result = train(config)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    online = next(m for m in logged if "eval/fid" in m)

    # Offline: the exported EMA weights, the same seed, steps, guidance and batch size.
    out = tmp_path / "samples.npz"
    assert main(["sample-ddp", "--ckpt", str(result.export), "--num-fid-samples", str(samples), "--seed", str(seed),
                 "--num-sampling-steps", str(steps), "--cfg-scale", "1.5", "--batch-size", str(batch),
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    report = tmp_path / "offline.json"
    assert main(["evaluate", str(out), str(reference), "--inception-weights", str(inception_weights),
                 "--batch-size", str(batch), "--no-progress", "--out-json", str(report), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    offline = json.loads(report.read_text())
    for key, row in (("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"), ("recall", "Recall")):
        # The same images (bit for bit) through the same features: the printed digits agree exactly.
        assert f"{online[f'eval/{key}']:.4f}" == f"{offline[key]:.4f}", key
        assert f"{row:<15}  {online[f'eval/{key}']:.4f}" in printed, key
        assert offline[key] == pytest.approx(online[f"eval/{key}"], rel=1e-9, abs=1e-12), key
    assert f"{online['eval/inception_score']:.2f}" == f"{offline['inception_score']:.2f}"


# --- the two reference pipelines ------------------------------------------------------------------------


def torch_fidelity_inception_score(logits):
    """torch-fidelity's `isc_features_to_metric` with numpy: RandomState(2020) shuffle, 10 splits at i*N//10."""
    logits = np.asarray(logits, np.float64)[np.random.RandomState(2020).permutation(len(logits))]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = probs[i * len(probs) // 10 : (i + 1) * len(probs) // 10]
        scores.append(np.exp((part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()))
    return float(np.mean(scores))


def test_the_jit_pipeline_is_fid_against_moments_only_and_torch_fidelitys_inception_score(
    tmp_path, inception_weights, capsys
):
    rng = np.random.default_rng(2)
    samples = rng.integers(0, 256, (12, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "samples.npz", samples)
    ref = write_folder(tmp_path / "ref", rng.integers(0, 160, (6, 32, 32, 3), np.uint8))
    extractor = InceptionFeatureExtractor(inception_weights, batch_size=4)
    moments = statistics_for_path(ref, extractor, progress=False)
    np.savez(tmp_path / "jit_in32_stats.npz", mu=moments.mu, sigma=moments.sigma)  # torch-fidelity's keys only

    def evaluate(*argv):
        out = tmp_path / "out.json"
        assert main(["evaluate", str(tmp_path / "samples.npz"), *map(str, argv), "--inception-weights",
                     str(inception_weights), "--batch-size", "4", "--no-progress", "--out-json", str(out)]) == 0
        return json.loads(out.read_text())

    adm = evaluate(ref)
    jit = evaluate(tmp_path / "jit_in32_stats.npz", "--reference-pipeline", "jit")
    assert jit["metrics"] == ["fid", "is"] and jit["reference_pipeline"] == "jit" and "sfid" not in jit
    assert jit["fid"] == pytest.approx(adm["fid"], rel=1e-9)  # the same moments: the same FID
    logits = extractor(samples).logits.numpy()
    assert jit["inception_score"] == pytest.approx(torch_fidelity_inception_score(logits), rel=1e-6)
    assert jit["inception_score"] != pytest.approx(adm["inception_score"], rel=1e-9)  # other splits
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a file of FID moments cannot give sFID: said before any network runs
        main(["evaluate", str(tmp_path / "samples.npz"), str(tmp_path / "jit_in32_stats.npz"), "--metrics", "fid,sfid"])
    err = capsys.readouterr().err
    assert "no sFID moments" in err and "\n" not in err.strip()
