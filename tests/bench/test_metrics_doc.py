"""docs/metrics.md lists every metric family of the registry, as the generator writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.metrics_doc import DOC, SECTION, family_rows, reference
from bench.report import read_section


def test_the_committed_reference_is_the_generated_one(model_cache: Path) -> None:
    committed = read_section(DOC, SECTION)
    assert committed is not None, f"{DOC} has no {SECTION} section"
    assert committed == reference(model_cache), "run: python -m bench.metrics_doc"


def test_a_family_without_a_reading_fails_the_generator() -> None:
    class Family:
        name, type, documentation, samples = "tta_new_family", "gauge", "new", []

    with pytest.raises(KeyError, match="tta_new_family has no entry in READING"):
        family_rows([Family()])  # type: ignore[list-item]
