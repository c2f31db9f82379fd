"""The Gradio page of `fastdit app`.

One way to show an error: every handler turns a failure (fastdit's, or a bad value in a field) into
one line in the status box and leaves the last picture and command as they were, so the page never
dies and the server keeps serving. Number fields carry no Gradio bounds for the same reason: Gradio
would report those in a pop-up of its own. Generations run one at a time, stream previews of the grid,
and stop from the Stop button or when their browser goes away; each session gets its own results."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import gradio as gr
import torch

from ..demo.run import TRAIN_RUN, DemoConfig
from ..errors import OptionError, UserError
from ..sampling import OPTIONS, Option, SamplingOptions, samplers_for
from ..sampling.presets import Preset
from ..sampling.recipe import SAMPLING_FIELDS, recorded_options, resolve, show_value
from ..train.state import checkpoint_path, export_path
from .classes import class_choices, label_of
from .job import DONE, PREVIEW, WAITING, Job
from .messages import field_name, in_page_words
from .models import DEMO_FOLDERS, DIGITS, MODEL_CHOICES, model_source, preset_choice
from .outputs import OutputFolder
from .request import (Limits, ModelCache, SampleRequest, Stopped, generate_grid, parse_interval, real_number,
                      request_name, request_value, seed_number, whole_number)

log = logging.getLogger(__name__)
DEFAULT_SAMPLER = "model default"
# A model with at most this many classes opens with every class chosen (as `fastdit sample` draws them).
FIRST_CLASSES = 16
# The sampling fields in the page's order, two a row: every option of `fastdit.sampling.options`
# (tests/test_sampling_schema.py checks that none is missing).
PAGE_FIELDS = ("sampler", "num_steps", "cfg_scale", "guidance_interval", "guided_channels", "time_shift", "eta", "precision",
               "diffusion_form", "diffusion_norm", "last_step", "last_step_size", "guidance_model")
# `generate` takes the fields from eta on after the seed and the session's last picture, with defaults
# (the fields the page had before them come first, so a call that gives only those keeps working).
LATE_FIELDS = PAGE_FIELDS.index("eta")


def field_value(option: Option, value):
    """What an option's field shows for `value`: a choice left to the model as "model default", a pair
    as text ("LOW HIGH", empty for none), a switch as a tick."""
    if option.kind == "choice":
        return DEFAULT_SAMPLER if value is None else value
    if option.kind == "pair":
        return "" if value is None else " ".join(repr(float(t)) for t in value)
    if option.kind == "path":
        return value or ""
    return request_value(option, value)


def field_values(options: SamplingOptions) -> dict:
    """What the page's sampling fields show for `options`, by option name."""
    return {name: field_value(OPTIONS[name], getattr(options, name)) for name in PAGE_FIELDS}


def read_field(option: Option, value):
    """A sampling field's value as the request's (`request_name`); a bad one is a message naming the field."""
    if option.kind == "choice":
        return option.default if value in (None, DEFAULT_SAMPLER) else value
    if option.kind == "int":
        return whole_number(value, option.label, int(option.bounds[0]))
    if option.kind == "float":
        return real_number(value, option.label)
    if option.kind == "pair":
        return parse_interval(value)
    if option.kind == "path":  # empty: none (classifier-free guidance)
        return (value or "").strip() or None
    return bool(value)


def option_field(option: Option, value, choices=None, **properties):
    """The component of an option's field (or, in a handler's outputs, its new value): a list for a
    choice (of `choices`, by default the option's), a number, text for a pair, a tick box for a switch.
    Number fields carry no Gradio bounds: a value out of range gets the page's message, not Gradio's pop-up."""
    if option.kind == "choice":
        return gr.Dropdown(value=value, choices=choices or list(option.choices()), **properties)
    if option.kind in ("int", "float"):
        return gr.Number(value=value, **properties)
    if option.kind in ("pair", "path"):
        return gr.Textbox(value=value, **properties)
    return gr.Checkbox(value=value, **properties)


# Defaults per model: the digits demo samples as `fastdit demo` does (read from its recipe, DemoConfig);
# the ImageNet models as `fastdit sample` does (250 steps, cfg 4, every channel guided, no shift).
DIGITS_RECIPE = DemoConfig()
DIGITS_SAMPLER, DIGITS_STEPS = DIGITS_RECIPE.sampling()
DIGITS_DEFAULTS = field_values(SamplingOptions(sampler=DIGITS_SAMPLER, num_steps=DIGITS_STEPS,
                                               cfg_scale=DIGITS_RECIPE.cfg_scale))
# What `make demo` leaves after its last training step: the example in the checkpoint box.
DIGITS_EXAMPLE = export_path(checkpoint_path(Path(DEMO_FOLDERS[0]) / TRAIN_RUN, DIGITS_RECIPE.steps))
IMAGENET_DEFAULTS = field_values(SamplingOptions())
# Gradio keeps a copy of every picture and preview it sends; those older than an hour go, checked
# every ten minutes (the server's own folder keeps the last few PNGs for download: .outputs).
GRADIO_CACHE_LIFETIME = (600, 3600)
# An 8x8 digit would be a speck: the grid fills its box, enlarged without smoothing.
PAGE_CSS = "#grid img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def recorded_defaults(info, choice: str, samplers) -> dict:
    """The page's values for a loaded checkpoint: the sampling recipe it records (training writes one:
    a MeanFlow model's says one step at cfg 1); files from before recipes get the digits demo's values
    (when the choice is the demo and its sampler fits) or `fastdit sample`'s."""
    if info.sampling:
        return field_values(recorded_options(info))
    # A digits run of another objective (`fastdit demo --objective ddpm`) may not offer the demo's sampler.
    return DIGITS_DEFAULTS if choice == DIGITS and DIGITS_SAMPLER in samplers else IMAGENET_DEFAULTS


def preset_values(preset: Preset) -> dict:
    """The page's values for a preset: its recipe, resolved as `fastdit sample --preset NAME` resolves it
    (the preset takes the place of a checkpoint's recipe; a field the page shows that the preset left
    unset keeps the command's default)."""
    return field_values(resolve({}, preset.as_source(), {}).options())


def preset_intro(preset: Preset) -> str:
    """The line under the title that says which preset the page started from, and what it sets."""
    recipe = preset.recipe
    model = f"{recipe['model']} {recipe['image_size']}px, " if recipe.get("model") else ""
    shown = ", ".join(f"{name} {show_value(recipe[name], name)}" for name in SAMPLING_FIELDS if name in recipe)
    return (f"Started with preset `{preset.name}` ({model}{shown}). Its values fill the sampling fields of every "
            f"model its sampler fits ({preset.objective} models); any field can still be changed.")


def error_message(err: BaseException) -> str:
    """What the status line says when something fails, in the page's words: a sampling option's error
    names its field ("number of sampling steps must be in [2, 1000], got 1 (the Steps field)")."""
    if isinstance(err, OptionError):
        return f"**Error:** {err.at_edge(field_name)}"
    if isinstance(err, UserError):
        return f"**Error:** {in_page_words(str(err))}"
    if isinstance(err, torch.OutOfMemoryError):
        return "**Error:** out of memory; make fewer images at once or pick a smaller model"
    log.exception("fastdit app: unexpected error", exc_info=err)  # the traceback goes to the server's console
    return f"**Error:** unexpected {type(err).__name__}: {err}"


def done_message(count: int) -> str:
    return f"Done: {count} image{'s' if count > 1 else ''}."


def build_page(demo_folders, device: str = "auto", work_dir: str | None = None, limits: Limits = Limits(),
               preset: Preset | None = None) -> gr.Blocks:
    """The page; with a `preset` (`fastdit app --preset NAME`) it starts on the preset's model, when the
    preset names one, and fills the sampling fields with the preset's values for every model it fits."""
    cache = ModelCache()
    wanted = preset_values(preset) if preset is not None else None
    pictures = OutputFolder(Path(work_dir or tempfile.mkdtemp(prefix="fastdit-app-")) / "pictures")
    # One generation samples at a time: a stopped one still finishes its current model call, and the
    # next waits for it (the event's concurrency limit alone would let them overlap for that call).
    sampling = threading.Lock()
    running: dict[str, Job] = {}  # session -> its generation, for the Stop button
    keep = gr.skip  # an output left as it is

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
                # A model of few classes (the ten digits) opens with every class chosen, a larger one with its first.
                first = names if len(names) <= FIRST_CLASSES else names[:1]
            status = f"Model: `{source.path or source.model_name}`"
            if wanted is not None:
                # As `fastdit sample --preset` does, the preset's values replace the model's own; a model
                # whose samplers do not include the preset's would only fail on Generate, so it keeps its own.
                if wanted["sampler"] in samplers:
                    defaults = wanted
                    status += f"; settings from preset `{preset.name}`"
                else:
                    status += (f"; preset `{preset.name}` is for {preset.objective} models (its sampler "
                               f"{wanted['sampler']} does not fit this one): the model's own settings are shown")
        except Exception as err:  # noqa: BLE001 - every failure becomes a message in the page
            return (keep(),) * (1 + len(PAGE_FIELDS)) + (error_message(err),)
        fields = [option_field(OPTIONS[name], defaults[name], choices=[DEFAULT_SAMPLER, *samplers] if name == "sampler" else None)
                  for name in PAGE_FIELDS]
        return (gr.Dropdown(choices=names, value=first), *fields, status)

    def read_request(choice, path, classes, per_class, seed, fields: dict) -> SampleRequest:
        """The request of the page's values; `fields`: the sampling fields' values, by option name."""
        request = SampleRequest(
            source=model_source(choice, path, demo_folders), labels=tuple(dict.fromkeys(label_of(c) for c in classes or ())),
            images_per_class=whole_number(per_class, "Images per class", 1),
            **{request_name(OPTIONS[name]): read_field(OPTIONS[name], value) for name, value in fields.items()},
            seed=seed_number(seed), device=device,
        )
        request.check(limits)
        return request

    def earlier_picture(last):
        """The last finished picture of this session (None if there is none, or it was since removed)."""
        return last[0] if last and Path(last[0]).is_file() else None

    def generate(choice, path, classes, per_class, sampler, steps, cfg, interval, official, shift, seed, last,
                 eta=OPTIONS["eta"].default, precision=OPTIONS["precision"].default,
                 diffusion_form=OPTIONS["diffusion_form"].default, diffusion_norm=OPTIONS["diffusion_norm"].default,
                 last_step=OPTIONS["last_step"].default, last_step_size=OPTIONS["last_step_size"].default,
                 guidance_model=field_value(OPTIONS["guidance_model"], OPTIONS["guidance_model"].default),
                 request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """Inputs: the model, the classes, the sampling fields of PAGE_FIELDS (from LATE_FIELDS on after
        the seed and the session's last picture). Outputs: picture, PNG, command, status, last
        finished (picture, command). A generator: it streams previews, and Gradio can close it between
        two yields (Stop, a client that left)."""
        fields = dict(zip(PAGE_FIELDS, (sampler, steps, cfg, interval, official, shift, eta, precision, diffusion_form,
                                        diffusion_norm, last_step, last_step_size, guidance_model)))
        try:
            sample = read_request(choice, path, classes, per_class, seed, fields)
        except Exception as err:  # noqa: BLE001
            yield keep(), keep(), keep(), error_message(err), keep()
            return
        out = pictures.new_path(f"fastdit-seed{sample.seed}.png")

        def work(job: Job) -> str:
            with sampling:
                progress(0, desc="loading the model (a download shows its progress here)")
                return generate_grid(sample, cache, out, progress=False, limits=limits, on_preview=job.preview,
                                     stop=job.stopping)

        job = Job(work)
        session = getattr(request, "session_hash", None)
        running[session] = job
        previewed = False
        try:
            yield keep(), keep(), keep(), "Generating...", keep()
            for kind, value in job.updates():
                if kind == PREVIEW:
                    grid, note = value
                    previewed = True
                    yield grid, keep(), keep(), f"Sampling: {note}...", keep()
                elif kind == WAITING:
                    yield keep(), keep(), keep(), keep(), keep()  # a heartbeat: Gradio may close us here
                elif kind == DONE:
                    yield str(out), str(out), value, done_message(len(sample.all_labels)), (str(out), value)
                else:  # failed or stopped: back to the last finished picture, beside the message
                    message = "Stopped." if isinstance(value, Stopped) else error_message(value)
                    yield earlier_picture(last) if previewed else keep(), keep(), keep(), message, keep()
        finally:
            job.stop()  # closed early (Stop, a client that left): the sampler ends at its next model call
            if running.get(session) is job:
                del running[session]

    def stop(last, request: gr.Request):
        job = running.get(getattr(request, "session_hash", None))
        if job is None:
            return keep(), keep()
        job.stop()
        return earlier_picture(last), "Stopped."

    with gr.Blocks(title="fastdit", delete_cache=GRADIO_CACHE_LIFETIME) as page:
        intro = "# fastdit\nClass-conditional samples from a Diffusion Transformer."
        gr.Markdown(intro + (f"\n\n{preset_intro(preset)}" if preset is not None else ""), elem_id="intro")
        start = wanted or IMAGENET_DEFAULTS  # the fields before the page's first load fills them for its model
        last = gr.State(None)  # (PNG path, command) of the session's last finished picture
        with gr.Row():
            with gr.Column():
                first_model = (preset_choice(preset) if preset is not None else None) or DIGITS
                model = gr.Dropdown(MODEL_CHOICES, value=first_model, label="Model", elem_id="model")
                path = gr.Textbox(label="Checkpoint (a local checkpoint; or a digits demo run elsewhere)",
                                  placeholder=str(DIGITS_EXAMPLE), elem_id="path")
                classes = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="Classes (type to search)",
                                      elem_id="classes")
                per_class = gr.Number(1, precision=0, label="Images per class", elem_id="per-class")
                components = {}
                for first in range(0, len(PAGE_FIELDS), 2):  # two a row (the last alone when they are odd)
                    with gr.Row():
                        for name in PAGE_FIELDS[first : first + 2]:
                            option = OPTIONS[name]
                            properties = dict(label=f"{option.label} {option.hint}".strip(), elem_id=option.page_id)
                            if option.kind == "int":
                                properties.update(precision=0)
                            if name == "sampler":  # the model's own, until the page's first load describes the model
                                properties.update(choices=[DEFAULT_SAMPLER])
                            value = DEFAULT_SAMPLER if name == "sampler" else start[name]
                            components[name] = option_field(option, value, **properties)
                # Text, not a number field: the browser would hold a seed as a float, exact only up to 2^53.
                seed = gr.Textbox("0", label="Seed (0 to 2^64 - 1)", max_lines=1, elem_id="seed")
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column():
                status = gr.Markdown("Pick a model and classes, then Generate.", elem_id="status")
                image = gr.Image(type="filepath", format="png", image_mode=None, label="Samples", interactive=False, height=420,
                                 buttons=["download", "fullscreen"], elem_id="grid")
                png = gr.File(label="PNG", elem_id="png")
                command = gr.Textbox(label="Reproduce with", buttons=["copy"], elem_id="command")
        option_fields = [components[name] for name in PAGE_FIELDS]
        model_outputs = [classes, *option_fields, status]
        model.change(describe_model, [model, path], model_outputs)
        # A pasted path is taken when the field loses focus, without Enter (Enter works too).
        path.submit(describe_model, [model, path], model_outputs)
        path.blur(describe_model, [model, path], model_outputs)
        page.load(describe_model, [model, path], model_outputs)
        fields = [model, path, classes, per_class, *option_fields[:LATE_FIELDS], seed, last, *option_fields[LATE_FIELDS:]]
        generation = button.click(generate, fields, [image, png, command, status, last], concurrency_limit=1,
                                  show_progress="minimal")
        stop_button.click(stop, [last], [image, status], cancels=[generation], queue=False)
    return page
