"""Regional compilation: torch.compile each transformer block in place, not the whole model.

The blocks of a DiT are the same code with other weights, so they compile to one graph (the weights
are inputs of it), compiled once instead of once per depth: a fraction of the whole model's compile
time, for most of its speed-up (PyTorch's "regional compilation" recipe). In place (`Module.compile`),
so the parameter names and the state dict stay those of the eager model.

What was compiled is counted (`CompileStats`, `model.compile_stats`): dynamo may decline a block
silently (a block first called inside `torch.func.jvp` is skipped for the rest of the run), and a run
that says "compiled" should know whether its blocks ran compiled code. Passes that must not trigger a
compile (MeanFlow's JVP target) run under `eager`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class CompileStats:
    graphs: int = 0  # graphs the backend compiled
    calls: int = 0  # calls of compiled graphs (one per block call that ran compiled code)


def _counted(backend, stats: CompileStats):
    """`backend` (a name or a callable) wrapped to count the graphs it compiles and their calls."""
    compile_graph = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def counting_backend(graph_module, example_inputs):
        stats.graphs += 1
        compiled = compile_graph(graph_module, example_inputs)

        @functools.wraps(compiled)
        def run(*args):
            stats.calls += 1
            return compiled(*args)

        return run

    return counting_backend


def compile_blocks(model: torch.nn.Module, backend="inductor") -> torch.nn.Module:
    """Compile every block of `model.blocks` in place with `backend`; blocks compiled before are left
    as they are, so calling it again (e.g. once per sampled batch) compiles nothing new. Blocks that
    `fastdit.train.setup.checkpoint_blocks` wrapped compile with their checkpoint traced in, so the
    recomputation in backward runs the compiled code too. `model.compile_stats` counts what ran compiled."""
    if not hasattr(model, "compile_stats"):
        model.compile_stats = CompileStats()
    # One backend object for every block: dynamo caches a graph per backend, so the blocks share one graph.
    counting = _counted(backend, model.compile_stats)
    for block in model.blocks:
        if block._compiled_call_impl is None:  # what `Module.compile` sets
            block.compile(backend=counting)
    return model


def eager(function):
    """`function` with torch.compile set aside while it runs: compiled regions inside it run their eager
    code, and nothing is compiled or marked as not compilable. For passes dynamo cannot trace (inside
    `torch.func.jvp`): met there first, a block would be skipped for the whole run."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return function(*args, **kwargs)

    return run
