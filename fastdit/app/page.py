"""The Gradio page of `fastdit app`. Every handler turns a failure into a message in the page, so the
page never dies and the server keeps serving; the queue runs one generation at a time, and each
browser session gets its own results."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import gradio as gr
import torch

from ..demo.run import TRAIN_RUN, DemoConfig
from ..errors import UserError
from ..sampling import OFFICIAL_CFG_SCALE, OFFICIAL_NUM_STEPS, samplers_for
from ..sampling.recipe import recorded_options
from ..train.state import checkpoint_path, export_path
from .classes import class_choices, label_of
from .models import DEMO_FOLDERS, DIGITS, LOCAL, MODEL_CHOICES, model_source
from .request import ModelCache, SampleRequest, generate_grid, parse_interval

log = logging.getLogger(__name__)
DEFAULT_SAMPLER = "model default"
# Defaults per model: the digits demo samples as `fastdit demo` does (read from its recipe, DemoConfig);
# the ImageNet models as `fastdit sample` does (250 steps, cfg 4).
DIGITS_RECIPE = DemoConfig()
DIGITS_SAMPLER, DIGITS_STEPS = DIGITS_RECIPE.sampling()
DIGITS_DEFAULTS = dict(sampler=DIGITS_SAMPLER, steps=DIGITS_STEPS, cfg=DIGITS_RECIPE.cfg_scale)
# What `make demo` leaves after its last training step: the example in the checkpoint box.
DIGITS_EXAMPLE = export_path(checkpoint_path(Path(DEMO_FOLDERS[0]) / TRAIN_RUN, DIGITS_RECIPE.steps))
IMAGENET_DEFAULTS = dict(sampler=DEFAULT_SAMPLER, steps=OFFICIAL_NUM_STEPS, cfg=OFFICIAL_CFG_SCALE)
# An 8x8 digit would be a speck: the grid fills its box, enlarged without smoothing.
PAGE_CSS = "#grid img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def recorded_defaults(info, choice: str, samplers) -> dict:
    """The page's values for a loaded checkpoint: the sampling recipe it records (training writes one:
    a MeanFlow model's says one step at cfg 1); files from before recipes get the digits demo's values
    (when the choice is the demo and its sampler fits) or `fastdit sample`'s."""
    if info.sampling:
        options = recorded_options(info)
        return dict(sampler=options.sampler or DEFAULT_SAMPLER, steps=options.num_steps, cfg=options.cfg_scale)
    # A digits run of another objective (`fastdit demo --objective ddpm`) may not offer the demo's sampler.
    return DIGITS_DEFAULTS if choice == DIGITS and DIGITS_SAMPLER in samplers else IMAGENET_DEFAULTS


def error_message(err: BaseException) -> str:
    """What the page says when something fails."""
    if isinstance(err, UserError):
        return f"**Error:** {err}"
    if isinstance(err, torch.OutOfMemoryError):
        return "**Error:** out of memory; make fewer images at once or pick a smaller model"
    log.exception("fastdit app: unexpected error")  # the traceback goes to the server's console
    return f"**Error:** unexpected {type(err).__name__}: {err}"


def build_page(demo_folders, device: str = "auto", work_dir: str | None = None) -> gr.Blocks:
    cache = ModelCache()
    work = Path(work_dir or tempfile.mkdtemp(prefix="fastdit-app-"))

    def describe_model(choice, path):
        """Class and sampler choices for the chosen model (local files are loaded to read them)."""
        try:
            source = model_source(choice, path, demo_folders)
            if source.path is None:
                names, samplers = class_choices(1000), samplers_for(source.official_objective)
                defaults, first = IMAGENET_DEFAULTS, [class_choices(1000)[207]]
            else:
                info = cache.get(source, device).info
                names, samplers = class_choices(info.config.num_classes, info.class_names), samplers_for(info.objective)
                defaults = recorded_defaults(info, choice, samplers)
                first = []
            status = f"Model: `{source.path or source.model_name}`"
        except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
            return gr.Dropdown(), gr.Dropdown(), gr.Number(), gr.Number(), error_message(err)
        return (gr.Dropdown(choices=names, value=first), gr.Dropdown(choices=[DEFAULT_SAMPLER, *samplers], value=defaults["sampler"]),
                gr.Number(value=defaults["steps"]), gr.Number(value=defaults["cfg"]), status)

    def generate(choice, path, classes, per_class, sampler, steps, cfg, interval, seed,
                 progress=gr.Progress(track_tqdm=True)):
        try:
            request = SampleRequest(
                source=model_source(choice, path, demo_folders), labels=tuple(label_of(c) for c in classes or ()),
                images_per_class=int(per_class), sampler=None if sampler == DEFAULT_SAMPLER else sampler,
                num_steps=int(steps), cfg_scale=float(cfg), guidance_interval=parse_interval(interval),
                seed=int(seed), device=device,
            )
            out = Path(tempfile.mkdtemp(dir=work)) / f"fastdit-seed{request.seed}.png"
            progress(0, desc="loading the model (a download shows its progress here)")
            command = generate_grid(request, cache, out)
        except Exception as err:  # noqa: BLE001
            return None, None, "", error_message(err)
        count = len(request.all_labels)
        return str(out), str(out), command, f"Done: {count} image{'s' if count > 1 else ''}."

    with gr.Blocks(title="fastdit") as page:
        gr.Markdown("# fastdit\nClass-conditional samples from a Diffusion Transformer.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(MODEL_CHOICES, value=DIGITS, label="Model", elem_id="model")
                path = gr.Textbox(label="Checkpoint path (local checkpoint; or a digits demo run elsewhere)",
                                  placeholder=str(DIGITS_EXAMPLE), elem_id="path")
                classes = gr.Dropdown([], multiselect=True, label="Classes (type to search)", elem_id="classes")
                per_class = gr.Number(1, precision=0, minimum=1, label="Images per class", elem_id="per-class")
                with gr.Row():
                    sampler = gr.Dropdown([DEFAULT_SAMPLER], value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
                    steps = gr.Number(OFFICIAL_NUM_STEPS, precision=0, label="Steps", elem_id="steps")
                with gr.Row():
                    cfg = gr.Number(OFFICIAL_CFG_SCALE, label="Guidance scale (1: none)", elem_id="cfg")
                    interval = gr.Textbox(label="Guidance interval LOW HIGH (empty: every step)", elem_id="interval")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                status = gr.Markdown("Pick a model and classes, then Generate.", elem_id="status")
                image = gr.Image(type="filepath", format="png", image_mode=None, label="Samples", interactive=False, height=420,
                                 buttons=["download", "fullscreen"], elem_id="grid")
                png = gr.File(label="PNG", elem_id="png")
                command = gr.Textbox(label="Reproduce with", buttons=["copy"], elem_id="command")
        model_outputs = [classes, sampler, steps, cfg, status]
        model.change(describe_model, [model, path], model_outputs)
        path.submit(describe_model, [model, path], model_outputs)
        page.load(describe_model, [model, path], model_outputs)
        button.click(generate, [model, path, classes, per_class, sampler, steps, cfg, interval, seed],
                     [image, png, command, status], concurrency_limit=1)
    return page
