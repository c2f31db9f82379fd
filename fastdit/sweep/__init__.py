"""`fastdit sweep`: the sampling settings behind a number, found cheaply.

Over a training run (or one checkpoint), every combination of the values given for the EMA length, the
guidance scale and interval, the sampler and its steps is sampled with a few thousand images and scored
with a cheap metric (MIND or FID, or the digit classifier's features on the demo's digits); the best
points are sampled again with the full count. The sweep writes a table, a plot of the metric against
each setting, and the winner as a recipe file that `fastdit sample-ddp --recipe FILE` reproduces bit
for bit. It resumes where it was killed and runs under torchrun like sample-ddp.

    space.py    the values tried and the points of their product
    weights.py  the weights of a point: the run's export, or an EMA reconstructed from its snapshots
    scoring.py  the metrics
    state.py    the state file: every score so far, for resuming
    report.py   the table and the plot
    runner.py   the loop
"""

from .runner import SweepJob, SweepResult, run_sweep
from .space import Point, SweepSpace, Weights, parse_ema, parse_interval
from .weights import SweepSource

__all__ = ["Point", "SweepJob", "SweepResult", "SweepSource", "SweepSpace", "Weights", "parse_ema", "parse_interval",
           "run_sweep"]
