"""Regional compilation: torch.compile each transformer block in place, not the whole model.

The blocks of a DiT are the same code with other weights, so they compile to one graph (the weights
are inputs of it), compiled once instead of once per depth: a fraction of the whole model's compile
time, for most of its speed-up (PyTorch's "regional compilation" recipe). In place (`Module.compile`),
so the parameter names and the state dict stay those of the eager model.
"""

from __future__ import annotations

import torch


def compile_blocks(model: torch.nn.Module, backend="inductor") -> torch.nn.Module:
    """Compile every block of `model.blocks` in place with `backend`; blocks compiled before are left
    as they are, so calling it again (e.g. once per sampled batch) compiles nothing new. Blocks that
    `fastdit.train.setup.checkpoint_blocks` wrapped compile with their checkpoint traced in, so the
    recomputation in backward runs the compiled code too."""
    for block in model.blocks:
        if block._compiled_call_impl is None:  # what `Module.compile` sets
            block.compile(backend=backend)
    return model
