"""FID-scale sampling under torchrun: per-index seeds and labels, resumable chunks, an ADM `.npz`."""

from .npz import write_adm_npz, write_npy_entry
from .runner import SampleJob, SampleReport, png_path, sample_ddp
from .workdir import Chunk, OutputPaths, plan_chunks

__all__ = [
    "Chunk",
    "OutputPaths",
    "SampleJob",
    "SampleReport",
    "plan_chunks",
    "png_path",
    "sample_ddp",
    "write_adm_npz",
    "write_npy_entry",
]
