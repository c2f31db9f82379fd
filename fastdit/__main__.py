import sys

from .cli import main

status = main()
# A process of a torchrun job leaves at once once its job returned: interpreter teardown after a gloo
# group can abort in torch 2.13 ("terminate called without an active exception", seen at the end of a
# successful 2-process FSDP run on a loaded machine), which would turn a finished job into a failed
# one. Everything the job wrote is already in place (atomic writes, logs closed). A job that never
# imported fastdit.distributed set up no process group (and `--help` should not import torch for it).
distributed = sys.modules.get("fastdit.distributed")
if distributed is not None and distributed.in_multiprocess_job():
    distributed.leave_job_now(status)
sys.exit(status)
