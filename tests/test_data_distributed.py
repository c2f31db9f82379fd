"""fastdit.distributed without torchrun: one process, every helper a no-op.

The two-process path runs in tests/test_extract_distributed.py.
"""

import pytest
import torch

from fastdit import distributed as dist
from fastdit.errors import UserError


def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist.init_from_env("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and not info.is_distributed
    assert not dist.is_initialized()
    values = torch.tensor([1.0, 3.0])
    assert torch.equal(dist.all_reduce_sum(values), torch.tensor([1.0, 3.0]))
    assert torch.equal(dist.all_reduce_mean(values), torch.tensor([1.0, 3.0]))
    dist.barrier()
    dist.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="no CUDA GPU is visible; use --device cpu"):
        dist.init_from_env("cuda")
