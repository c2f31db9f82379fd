"""`fastdit presets`: the named sampling settings, each with its published figure and where it comes from."""

from __future__ import annotations

import argparse

HELP = "list the named sampling presets (--preset NAME of sample, sample-ddp) with their published FIDs"
USES_TORCH = False  # a listing: no --threads, no look at the machine's load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="show one preset's every setting")


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
    return 0
