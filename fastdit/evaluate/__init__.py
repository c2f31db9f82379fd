"""Built-in evaluation with the ADM suite's definitions: FID, sFID, Inception Score, precision, recall;
FD-DINOv2 as Stein et al. 2023 define it (`fastdit.evaluate.dinov2`), MIND (`.mind`), CMMD (`.cmmd`) and
FDr6 (`.fdr`) as their papers do.

The numbers are those of openai/guided-diffusion's `evaluations/evaluator.py` (the evaluator behind
DiT's and most ImageNet papers' tables), computed in plain PyTorch with the TF-converted
Inception-v3 of 2015-12-05:

    from fastdit.evaluate import InceptionFeatureExtractor, compute_statistics, statistics_for_path, compare

    extractor = InceptionFeatureExtractor(device="cuda")        # downloads the weights once
    ref = statistics_for_path("VIRTUAL_imagenet256_labeled.npz", extractor, reference=True)
    stats = compute_statistics(uint8_nhwc_batches, extractor)   # any iterable; nothing written
    print(compare(stats, ref))  # {'fid': ..., 'sfid': ..., 'inception_score': ..., 'precision': ..., 'recall': ...}

    dinov2 = DinoV2FeatureExtractor(device="cuda")              # DINOv2 ViT-L/14 (Stein et al.), downloaded once
    ref = statistics_for_path("ref_images/", extractor, reference=True, dinov2=dinov2)
    stats = compute_statistics(uint8_nhwc_batches, extractor, dinov2=dinov2)
    print(compare(stats, ref, metrics=METRICS))                 # ... and 'fd_dinov2'
"""

from .cmmd import CMMD_ENCODER, CMMDFeatureExtractor, cmmd_preprocess, mmd_rbf
from .dinov2 import FD_DINOV2_ENCODER, DinoV2FeatureExtractor, stein_preprocess
from .fdr import FDR6_SPACES, FDRFeatureExtractors, fdr6
from .features import (
    IS_SPLIT_SIZE,
    InceptionFeatureExtractor,
    compute_statistics,
    float_images_to_uint8,
    statistics_for_path,
    statistics_from_features,
)
from .inception import InceptionV3, load_inception, resize_bilinear_tf1
from .metrics import PR_DISTANCES, frechet_distance, inception_score, precision_recall
from .mind import MIND_PROJECTIONS, monge_inception_distance
from .statistics import (
    ADM_METRICS,
    METRICS,
    REFERENCE_PIPELINES,
    EvalStatistics,
    compare,
    load_statistics,
    save_statistics,
)

__all__ = [
    "ADM_METRICS",
    "CMMD_ENCODER",
    "CMMDFeatureExtractor",
    "FDR6_SPACES",
    "FDRFeatureExtractors",
    "MIND_PROJECTIONS",
    "REFERENCE_PIPELINES",
    "cmmd_preprocess",
    "fdr6",
    "mmd_rbf",
    "monge_inception_distance",
    "DinoV2FeatureExtractor",
    "FD_DINOV2_ENCODER",
    "IS_SPLIT_SIZE",
    "METRICS",
    "PR_DISTANCES",
    "EvalStatistics",
    "InceptionFeatureExtractor",
    "InceptionV3",
    "compare",
    "compute_statistics",
    "float_images_to_uint8",
    "frechet_distance",
    "inception_score",
    "load_inception",
    "load_statistics",
    "precision_recall",
    "resize_bilinear_tf1",
    "save_statistics",
    "statistics_for_path",
    "statistics_from_features",
    "stein_preprocess",
]
