"""Training methods beside the objective, one module each, registered by name (`base.py` has the
protocol; the step, the loop and the checkpoints name none of them):

* `ema`         the EMA of the weights, which runs export and sample       `ema.py`
* `posthoc-ema` EDM2's power-function EMAs and their snapshots            `posthoc.py`
* `repa`        REPA's alignment of a block with a frozen encoder          `repa.py`
* `routing`     TREAD's token routing through a span of blocks             `routing.py`
* `dispersive`  the dispersive loss on a block's hidden states             `dispersive.py`

Adding one is a module with a registered `TrainExtension` subclass and one import line below; the
order of the imports is the order of the hooks within a step (and of the extensions' draws).
"""

from .base import (
    EXTENSIONS,
    BuildContext,
    MicroBatch,
    RunContext,
    Term,
    TrainExtension,
    build_extensions,
    enabled_extensions,
    register_extension,
)

# The built-in extensions: importing a module registers it.
from . import ema, posthoc, repa, routing, dispersive  # noqa: E402,F401  isort: skip

__all__ = [
    "EXTENSIONS",
    "BuildContext",
    "MicroBatch",
    "RunContext",
    "Term",
    "TrainExtension",
    "build_extensions",
    "enabled_extensions",
    "register_extension",
]
