"""How a model is sampled when nothing says otherwise, and which guidance it admits: an objective's
sampling policy, kept apart from its training contract (`Objective.draw` and `Objective.losses`).

Every objective has one (`Objective.sampling`); most are fixed by the objective's kind (DiT's IDDPM
samples with its own ancestral sampler in 250 steps), MeanFlow's follows its settings (guidance trained
in at the scale ω / (1 − κ), or fed as an input over a trained range).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError

# DiT's and SiT's sampling: 250 steps of the model's own sampler (DiT's sample.py, SiT's sample.py).
DEFAULT_NUM_STEPS = 250


@dataclass(frozen=True)
class SamplingPolicy:
    """`sampler` and `num_steps`: what sampling uses when no flag, preset or recipe says otherwise.
    `trained_guidance`: the classifier-free guidance scale trained into the network (sampling must not
    guide again), None when sampling guides. `guidance_input`: the range of scales the network takes as
    an input (one call per step, no doubled batch), None when it takes none. `no_interval`: why a guidance
    interval means nothing for this model (MeanFlow's jumps cross it), None when it applies."""

    objective: str  # the objective's name, for messages
    sampler: str
    num_steps: int = DEFAULT_NUM_STEPS
    trained_guidance: float | None = None
    guidance_input: tuple[float, float] | None = None
    no_interval: str | None = None

    def cfg_scale(self, requested: float, *, conditional: bool) -> float:
        """The scale to sample with when `requested` is what the run or the user would like: 1 where
        guiding is impossible (no null class: not `conditional`) or would guide twice (trained in)."""
        if self.trained_guidance is not None or not conditional:
            return 1.0
        return float(requested)

    def check_guidance(self, cfg_scale: float, interval) -> None:
        """An OptionError (about cfg_scale or guidance_interval) for a guidance this model cannot be sampled with."""
        if self.trained_guidance is not None and cfg_scale != 1.0:
            raise OptionError("this {objective} model has its guidance trained in (scale {trained:g}): "
                              "sample it with {cfg_scale:1}, not {scale:g}", "cfg_scale",
                              objective=self.objective, trained=self.trained_guidance, scale=cfg_scale)
        if self.guidance_input is not None:
            low, high = self.guidance_input
            if not low <= cfg_scale <= high:
                raise OptionError("this {objective} model was trained for guidance scales in [{low:g}, {high:g}]; "
                                  "pick {cfg_scale} in that range, not {scale:g}", "cfg_scale",
                                  objective=self.objective, low=low, high=high, scale=cfg_scale)
        if interval is not None and self.no_interval is not None:
            raise OptionError("{why}; leave {guidance_interval} unset", "guidance_interval", why=self.no_interval)
