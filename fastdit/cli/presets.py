"""`fastdit presets`: the named sampling settings, each with its published figure and where it comes from."""

from __future__ import annotations

import argparse

HELP = ("list the named sampling presets (--preset NAME of sample, sample-ddp) with their published FIDs, and the "
        "training presets behind them (train --preset NAME) with their estimated GPU-hours")
USES_TORCH = False  # a listing: no --threads, no look at the machine's load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="show one preset's every setting (sampling or training)")


def describe(preset) -> list[str]:
    from ..sampling.recipe import FLAGS, show_value

    lines = [f"{preset.name}: for {preset.objective} models; " + _figures(preset)]
    lines.append(f"  source: {preset.source}")
    lines += [f"  {name:<18} {show_value(value, name):<14} ({FLAGS[name]})" for name, value in preset.recipe.items()]
    return lines


def _figures(preset) -> str:
    return ", ".join(f"{metric.upper()} {value:g}" for metric, value in preset.published.items()) or "no published figure"


def run(args: argparse.Namespace) -> int:
    from ..sampling.presets import PRESETS, get_preset
    from ..train.presets import TRAIN_PRESETS

    if args.name in TRAIN_PRESETS:
        print("\n".join(describe_training(TRAIN_PRESETS[args.name])))
        return 0
    if args.name is not None:
        print("\n".join(describe(get_preset(args.name))))
        return 0
    width = max(len(name) for name in PRESETS)
    for preset in PRESETS.values():
        recipe = preset.recipe
        model = f"{recipe['model']} {recipe['image_size']}px" if recipe.get("model") else "your own model (--ckpt)"
        print(f"{preset.name:<{width}}  {_figures(preset):<9}  {model}: {recipe['sampler']} {recipe['num_steps']}, "
              f"cfg {recipe['cfg_scale']:g}  [{preset.source}]")
    print("use: fastdit sample-ddp --preset NAME (any flag overrides one setting); fastdit presets NAME shows all of them")
    print()
    print("\n".join(training_lines()))
    return 0


# ------------------------------------------------------------------------------------------------
# The training side: `fastdit train --preset NAME` (`fastdit.train.presets`)
# ------------------------------------------------------------------------------------------------


def _hours(preset) -> str:
    from ..train.presets import estimated_gpu_hours

    best, worst = estimated_gpu_hours(preset)
    return f"≈{_thousands(best)}-{_thousands(worst)} H100-h"


def _thousands(hours: float) -> str:
    return f"{hours / 1000:.1f}k" if hours >= 1000 else f"{hours:.0f}"


def training_lines() -> list[str]:
    """The training presets, each beside the sampling presets of the model it trains."""
    from ..sampling.presets import PRESETS
    from ..train.presets import ASSUMED_MFU, H100_BF16_TFLOPS, TRAIN_PRESETS

    width = max(len(name) for name in TRAIN_PRESETS)
    lines = [f"training presets (fastdit train --preset NAME; GPU-hours are estimates: the recipe's model FLOPs over "
             f"an H100's {H100_BF16_TFLOPS:g} TFLOP/s bf16 at {ASSUMED_MFU[0]:.0%}-{ASSUMED_MFU[1]:.0%} MFU, the best "
             "public DiT-XL/2 training efficiencies):"]
    for preset in TRAIN_PRESETS.values():
        settings = preset.settings
        length = (f"{preset.steps() / 1e6:g}M steps" if settings.get("max_steps") else
                  f"{settings['epochs']} epochs ({preset.steps() / 1e6:.2f}M steps)")
        sampling = ", ".join(f"{name} ({_figures(PRESETS[name])})" for name in preset.sampling) or \
            f"its own recipe, {settings.get('recipe_sampler')} {settings.get('recipe_steps')} step(s)"
        figure = ", ".join(f"{metric.upper()} {value:g}" for metric, value in preset.published.items())
        lines.append(f"{preset.name:<{width}}  {settings['model']} {settings['image_size']}px {settings['objective']}, "
                     f"batch {settings['global_batch_size']}, lr {settings['lr']:g}, {length}  {_hours(preset)}  "
                     f"{figure} -> sample: {sampling}")
    lines.append("use: fastdit train --preset NAME --features-path STORE (any flag overrides one setting); "
                 "fastdit presets NAME shows all of them")
    return lines


def describe_training(preset) -> list[str]:
    from ..train.presets import training_flops

    figure = ", ".join(f"{metric.upper()} {value:g}" for metric, value in preset.published.items())
    lines = [f"{preset.name}: a training recipe; {figure}; {preset.steps():,} steps, "
             f"{training_flops(preset):.3g} model FLOPs, {_hours(preset)} (an estimate)"]
    lines.append(f"  source: {preset.source}")
    if preset.notes:
        lines.append(f"  note: {preset.notes}")
    if preset.sampling:
        lines.append(f"  sample with: fastdit sample-ddp --ckpt EXPORT --preset {preset.sampling[0]}")
    lines += [f"  {name:<22} {value!s:<16} (--{name.replace('_', '-')})" for name, value in preset.settings.items()]
    return lines
