"""FID (and the other ADM metrics) of the EMA model during training, with the evaluation code of
`fastdit evaluate`: every process samples its share of `eval_samples` images with the loop of
`fastdit sample-ddp` (`fastdit.sampling.indexed`: image i seeded and labelled uniformly by (seed, i)),
runs Inception on them, and the main process merges everyone's features into the statistics."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from .. import distributed
from ..evaluate import InceptionFeatureExtractor, compare, statistics_for_path, statistics_from_features
from ..evaluate.inception import InceptionOutputs
from ..sampling import SamplingOptions
from ..sampling.indexed import sample_by_index

_REFERENCE_CACHE: dict = {}


def _extractor(config, device) -> InceptionFeatureExtractor:
    key = ("extractor", config.evaluation.inception_weights, str(device))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = InceptionFeatureExtractor(
            config.evaluation.inception_weights, device=device, batch_size=config.evaluation.eval_batch_size, progress=False
        )
    return _REFERENCE_CACHE[key]


def _reference(config, extractor):
    key = ("reference", config.evaluation.eval_ref)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = statistics_for_path(config.evaluation.eval_ref, extractor, reference=True, progress=False)
    return _REFERENCE_CACHE[key]


@torch.no_grad()
def fid_of_model(config, objective, ema, data, dist) -> dict[str, float] | None:
    """The metrics dict on the main process, None on the others."""
    device = dist.device
    extractor = _extractor(config, device)
    reference = _reference(config, extractor) if dist.is_main else None
    evaluation, seed = config.evaluation, config.optimisation.global_seed
    mine = list(range(dist.rank, evaluation.eval_samples, dist.world_size))
    options = SamplingOptions(num_steps=evaluation.eval_sampling_steps, cfg_scale=evaluation.eval_cfg_scale)
    outputs, image_size = [], None
    batches = sample_by_index(ema, data.decoder(), mine, seed=seed, batch_size=evaluation.eval_batch_size,
                              options=options, objective=objective, device=device)
    for _, _, images in batches:
        image_size = tuple(images.shape[1:3])
        features = extractor(images)
        outputs.append(InceptionOutputs(pool=features.pool.cpu(), spatial=features.spatial.cpu(), logits=features.logits.cpu()))
    if dist.is_distributed:
        gathered = [None] * dist.world_size if dist.is_main else None
        torch_dist.gather_object(outputs, gathered, dst=0)
        if dist.is_main:
            outputs = [batch for rank_outputs in gathered for batch in rank_outputs]
    distributed.barrier()
    if not dist.is_main:
        return None
    stats = statistics_from_features(outputs, device=device, image_size=image_size, source="EMA samples")
    metrics = compare(stats, reference, device=str(device))
    return {k: float(v) for k, v in metrics.items() if k in ("fid", "sfid", "inception_score", "precision", "recall") and v is not None}
