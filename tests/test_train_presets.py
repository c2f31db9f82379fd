"""`fastdit train --preset NAME`: every published recipe builds a valid run, a flag overrides one field
(even one given at fastdit's default), the run records the preset, and `fastdit presets` lists the training
side beside the sampling side with estimated GPU-hours."""

import argparse

import pytest

from cli_runner import run_cli
from fastdit.cli.train import add_arguments, config_from_args
from fastdit.errors import UserError
from fastdit.sampling.presets import PRESETS
from fastdit.train.config import TrainConfig
from fastdit.train.presets import TRAIN_PRESETS, estimated_gpu_hours, training_flops


def parse(*words):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args([str(w) for w in words]))


@pytest.mark.parametrize("name", list(TRAIN_PRESETS))
def test_every_preset_builds_a_valid_run_that_records_it(name):
    preset = TRAIN_PRESETS[name]
    config = parse("--preset", name, "--features-path", "store").validate()
    assert config.run.preset == name
    flat = config.to_flat()
    assert {key: flat[key] for key in preset.settings} == preset.settings
    assert all(sampling in PRESETS for sampling in preset.sampling)  # the sampling side it names exists
    assert preset.source and preset.published
    # The record round-trips through the run folder's config.json.
    assert TrainConfig.from_dict(config.to_dict()).run.preset == name


def test_a_flag_overrides_one_field_even_at_fastdits_default():
    preset = TRAIN_PRESETS["meanflow-xl2"]
    base = parse("--preset", "meanflow-xl2", "--features-path", "store").to_flat()
    # 0.999 is fastdit's default beta2 and MeanFlow's is 0.95: given on the command line, the flag wins.
    over = parse("--preset", "meanflow-xl2", "--features-path", "store", "--beta2", "0.999", "--lr", "2e-4").to_flat()
    assert over["beta2"] == 0.999 and preset.settings["beta2"] == 0.95 and over["lr"] == 2e-4
    assert {key for key in base if base[key] != over[key]} == {"beta2", "lr"}
    # Without --preset, nothing changes: the fields' defaults, the flags given over them.
    plain = parse("--data-path", "digits", "--grad-checkpointing")
    assert plain.run.preset is None and plain.optimisation.beta2 == 0.999 and plain.run.gradient_checkpointing == "blocks"


def test_the_papers_numbers_are_the_presets():
    dit, repa, meanflow = TRAIN_PRESETS["dit-xl2"], TRAIN_PRESETS["repa-sit-xl2"], TRAIN_PRESETS["meanflow-xl2"]
    assert (dit.settings["global_batch_size"], dit.settings["lr"], dit.settings["ema_decay"]) == (256, 1e-4, 0.9999)
    assert dit.steps() == 7_000_000 and TRAIN_PRESETS["dit-xl2-400k"].steps() == 400_000
    assert TRAIN_PRESETS["sit-xl2"].steps() == 7_000_000 and TRAIN_PRESETS["sit-xl2"].settings["objective"] == "flow"
    assert (repa.settings["repa"], repa.settings["repa_depth"], repa.settings["repa_weight"]) == ("dinov2-vitb14", 8, 0.5)
    assert (repa.settings["global_batch_size"], repa.settings["lr"]) == (256, 1e-4)
    config = parse("--preset", "meanflow-xl2", "--features-path", "store")
    assert config.build_objective().trained_guidance == pytest.approx(2.5)  # ω / (1 − κ) = 0.2 / 0.08
    assert meanflow.steps() == 240 * (1_281_167 // 256)


def test_raes_preset_trains_ditdh_xl_in_raes_space_on_raes_schedule():
    from fastdit.train.step import learning_rate

    config = parse("--preset", "rae-ditdh-xl", "--features-path", "store").validate()
    assert (config.model.name, config.data.vae, config.objective.name) == ("DiTDH-XL", "rae:dinov2-b-reg", "rae")
    optim, per_epoch = config.optimisation, 1_281_167 // 1024
    assert TRAIN_PRESETS["rae-ditdh-xl"].steps() == 800 * per_epoch
    # RAE's "linear" scheduler: 2e-4 for 40 epochs, linear to 2e-5 at epoch 800, constant after.
    assert learning_rate(optim, 0) == learning_rate(optim, 40 * per_epoch - 1) == 2e-4
    assert learning_rate(optim, 420 * per_epoch) == pytest.approx(1.1e-4)
    assert learning_rate(optim, 800 * per_epoch) == learning_rate(optim, 1400 * per_epoch) == pytest.approx(2e-5)
    # Its model FLOPs read the RAE space's 768x16x16 tokens: 256 tokens as DiT-XL/2, a wider model and head.
    per_image = training_flops(TRAIN_PRESETS["rae-ditdh-xl"]) / (800 * per_epoch * 1024)
    assert 712e9 < per_image < 2 * 712e9


@pytest.mark.parametrize("flags, message", [(["--final-lr", "1e-5"], "--lr-decay-end (0) must come after"),
                                            (["--lr-decay-end", "10"], "need --final-lr")])
def test_a_decay_without_its_ends_is_one_line(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse("--data-path", "digits", *flags).validate()


def test_gpu_hours_are_derived_from_model_flops():
    # DiT-XL/2 at 256: ≈712 GFLOPs per image per training step (ANCHORS.md: 3 x 237), times 7M x 256 images.
    dit = TRAIN_PRESETS["dit-xl2"]
    per_image = training_flops(dit) / (dit.steps() * 256)
    assert per_image == pytest.approx(712e9, rel=0.01)
    best, worst = estimated_gpu_hours(dit)
    assert best == pytest.approx(training_flops(dit) / (989e12 * 0.20) / 3600) and worst > best
    # REPA adds its encoder and projector; MeanFlow its JVP and guided targets: more per image than DiT.
    for name in ("repa-sit-xl2", "meanflow-xl2"):
        preset = TRAIN_PRESETS[name]
        assert training_flops(preset) / (preset.steps() * 256) > per_image


def test_presets_lists_both_sides_and_help_names_them(capsys):
    assert run_cli("presets") == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in PRESETS) and all(name in printed for name in TRAIN_PRESETS)
    assert "H100-h" in printed and "estimates" in printed and "-> sample: dit-xl2-256" in printed
    assert run_cli("presets", "repa-sit-xl2") == 0
    shown = capsys.readouterr().out
    assert "repa_depth" in shown and "(--repa-depth)" in shown and "source: REPA paper" in shown
    assert run_cli("train", "--help") == 0
    assert "meanflow-xl2" in capsys.readouterr().out


def test_an_unknown_preset_is_one_line(capsys):
    assert run_cli("train", "--preset", "dit-xxl", "--data-path", "digits") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown training preset 'dit-xxl'" in err
