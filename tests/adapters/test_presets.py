"""Every adapter's named presets: recommended (the default) and paper, each valid and described."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapters import ADAPTERS
from adapters.presets import PAPER, PRESETS, RECOMMENDED, UnknownPresetError, preset_config


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_has_a_recommended_and_a_paper_preset(name: str) -> None:
    assert {RECOMMENDED, PAPER} <= PRESETS[name].keys()
    assert next(iter(PRESETS[name])) == RECOMMENDED  # listed first
    for preset in PRESETS[name].values():
        ADAPTERS[name].config.model_validate(preset.config)  # raises if a preset is invalid
        assert preset.use_when and preset.accuracy


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_paper_preset_is_the_config_defaults(name: str) -> None:
    """The adapter files' defaults are the papers' settings; the paper preset adds nothing."""
    assert PRESETS[name][PAPER].config == {}


def test_adabn_recommends_the_measured_default() -> None:
    # docs/accuracy.md: a 64-image source prior, no window: never worse than source
    assert preset_config("adabn") == {"prior_images": 64.0}
    assert preset_config("adabn", PAPER) == {}


def test_request_fields_override_the_preset() -> None:
    assert preset_config("adabn", None, {"window": 512}) == {"prior_images": 64.0, "window": 512}
    assert preset_config("adabn", None, {"prior_images": 0}) == {"prior_images": 0}
    assert preset_config("unmix_tns", "paper_mixed", {"seed": 3}) == {"components": 128, "seed": 3}


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownPresetError) as info:
        preset_config("adabn", "fast")
    assert str(info.value) == (
        "adapter 'adabn' has no preset 'fast'; valid: continual, paper, recommended"
    )


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_preset_figures_are_those_of_docs_accuracy(name: str) -> None:
    """Each error figure of a preset is written in docs/accuracy.md (made by bench.accuracy)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "accuracy.md").read_text()
    for preset in PRESETS[name].values():
        for figure in re.findall(r"\b\d+\.\d\b", preset.accuracy):
            assert re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", doc), (name, figure)
