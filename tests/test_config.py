"""Presets, overrides and their errors."""

from __future__ import annotations

import pytest

from slotlab.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
    load_config,
    save_config,
)
from slotlab.errors import UserError


def test_overrides_are_typed():
    cfg = apply_overrides(get_preset("smoke"), ["train.lr=0.01", "model.num_slots=9", "data.cache=false",
                                                "data.name=sprites"])
    assert cfg.train.lr == 0.01 and cfg.model.num_slots == 9 and cfg.data.cache is False


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key"),
    ("train.steps=abc", "expected a value of type int"),
    ("data.cache=maybe", "expected a value of type bool"),
    ("train=3", "is a section"),
    ("steps", "key=value"),
    ("model.decoder_octave_fade=100", "model.decoder_octaves=0"),  # a fade of no octaves
    ("model.decoder_pixels=0.5", "model.decoder_kind=mlp"),  # the convolutional decoder draws every pixel
    ("model.decoder_kind=mlps", "model.decoder_kind"),
    ("model.decoder_kernel=4", "must be odd"),
    ("task=setpred model.decoder_kind=mlp", "task=setpred does not use it"),
    ("task=slate train.decoder_lr_scale=3", "task=slate has no decoder"),
    ("model.decoder_frame=centre model.grouping=invariant_slot_attention", "draws slots in its own frames"),
    ("model.decoder_frame=centre model.decoder_kind=mlp", "does not draw slots in their frames"),
    ("model.decoder_frame=centre_spread model.quantiser=vq", "not available with model.quantiser=vq"),
    ("task=setpred model.decoder_frame=centre", "task=setpred does not use it"),
    ("model.decoder_frame=object", "model.decoder_frame"),
    ("model.decoder_slot_edges=true model.decoder_kind=mlp", "convolutional decoder"),
    ("model.decoder_slot_edges=true model.decoder_frame=centre", "not with slots drawn in their frames"),
    ("model.resolution=32", "model.resolution=32 is above data.resolution=16"),
    ("model.resolution=8 model.decoder_kind=mlp", "model.decoder_kind=mlp"),
    ("task=setpred model.resolution=8", "task=setpred"),
    ("model.resolution=12", "model.resolution=12 must be model.decoder_grid=4 times a power of two"),
])
def test_bad_overrides_raise_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(get_preset("smoke"), override.split())


def test_the_mlp_decoder_has_no_kernel():
    cfg = apply_overrides(get_preset("smoke"), ["model.decoder_kind=mlp", "model.decoder_kernel=4"])
    assert cfg.model.decoder_kernel == 4  # unused by the per-pixel decoder, so not an error


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_every_preset_round_trips_through_json(tmp_path):
    for name in list_presets():
        cfg = get_preset(name)
        assert config_from_dict(config_to_dict(cfg)) == cfg
        save_config(cfg, tmp_path / f"{name}.json")
        assert load_config(tmp_path / f"{name}.json") == cfg


def test_corrupt_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="corrupt config"):
        load_config(path)
