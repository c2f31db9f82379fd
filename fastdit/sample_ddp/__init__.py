"""FID-scale sampling under torchrun: per-index seeds and labels, resumable chunks, an ADM `.npz`."""

from .labels import labels_for, uniform_label
from .npz import write_adm_npz, write_npy_entry
from .runner import SampleJob, SampleReport, png_path, sample_ddp
from .workdir import Chunk, OutputPaths, plan_chunks

__all__ = [
    "Chunk",
    "OutputPaths",
    "SampleJob",
    "SampleReport",
    "labels_for",
    "plan_chunks",
    "png_path",
    "sample_ddp",
    "uniform_label",
    "write_adm_npz",
    "write_npy_entry",
]
