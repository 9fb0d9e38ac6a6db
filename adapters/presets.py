"""Named configurations of each adapter: the recommended one, and the papers' own.

Naming an adapter without a preset gives its ``recommended`` preset, the configuration that
docs/accuracy.md measured best across protocols; ``paper`` is the seed paper's setting, as the
adapter's config defaults are. A request's own config fields override the preset's. Every preset
carries its measured figure and a one-line "use when", which ``GET /v1/adapters`` shows.

The figures: CIFAR-10-C severity 5, ResNet-20, mean error % over the 15 corruptions, from the
summary of docs/accuracy.md (``python -m bench.accuracy``; full size where it was run, else the
reduced CPU run). Lower is better; source is 57.6 i.i.d., 57.5 label-correlated, 56.0 at N=1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.base import AdapterError

RECOMMENDED = "recommended"
PAPER = "paper"


class UnknownPresetError(AdapterError, KeyError):
    """A preset name that the adapter does not have; the message lists the valid ones."""

    def __init__(self, adapter: str, name: str, valid: list[str]) -> None:
        super().__init__(f"adapter {adapter!r} has no preset {name!r}; valid: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Preset:
    """One named configuration: the config fields it sets, its measured figure, when to use it."""

    use_when: str
    accuracy: str
    config: dict[str, Any] = field(default_factory=dict)


_SOURCE = Preset(
    "a baseline, or when a stream's images are too few or too odd to trust their statistics",
    "i.i.d. B=64 57.6, Dirichlet(0.1) 57.5, N=1 56.0",
)
_TBN = Preset(
    "large i.i.d. batches (>= 64 images, classes mixed); never single images or sorted labels",
    "i.i.d. B=64 37.6, Dirichlet(0.1) 83.0, N=1 87.4",
)
_ALPHA_BN = Preset(
    "small or label-correlated batches where TBN fails, with no state to keep",
    "i.i.d. B=64 45.4, Dirichlet(0.1) 54.8, N=1 47.9",
)
_MOMENTUM = Preset(
    "label-correlated or single-image streams of one domain; not continual shift (it freezes)",
    "i.i.d. B=64 38.3, Dirichlet(0.1) 44.1, N=1 42.9, continual 76.7",
)

# Issue 20's adapters: full size, all 15 corruptions (docs/accuracy.md, "Issue 20, full size").
_BALANCED = Preset(
    "label-correlated streams (one class at a time) where AdaBN drifts toward the current class",
    "i.i.d. B=64 38.0, continual 38.5, Dirichlet(0.1) 45.4, mixed 51.0, N=1 37.5",
)
_GATED = Preset(
    "i.i.d. streams with domain switches; not label-correlated streams (its gate opens there)",
    "i.i.d. B=64 37.1, continual 36.9, Dirichlet(0.1) 75.9, mixed 50.0, N=1 37.3",
)

PRESETS: dict[str, dict[str, Preset]] = {
    "source": {RECOMMENDED: _SOURCE, PAPER: _SOURCE},
    "tbn": {RECOMMENDED: _TBN, PAPER: _TBN},
    "adabn": {
        RECOMMENDED: Preset(
            "any stream (the server's default where balanced's per-class state is too large): "
            "never worse than source in any protocol measured",
            "i.i.d. B=64 37.0, Dirichlet(0.1) 49.7, N=1 37.1, continual 47.3",
            {"prior_images": 64.0},
        ),
        PAPER: Preset(
            "i.i.d. batches of one domain; no source prior, so the first single images are noisy",
            "i.i.d. B=64 36.8, Dirichlet(0.1) 49.9, N=1 45.0 (reduced), continual 47.2",
        ),
        "continual": Preset(
            "continual shift when labels are known not to be correlated (forgets old domains)",
            "continual 36.8 (ResNet-32 34.5), the best measured there; under Dirichlet(0.1) 71.3",
            {"prior_images": 64.0, "window": 512},
        ),
    },
    "alpha_bn": {RECOMMENDED: _ALPHA_BN, PAPER: _ALPHA_BN},
    "balanced": {
        RECOMMENDED: _BALANCED,
        PAPER: _BALANCED,
        "gated": Preset(
            "a stream of unknown kind (the server's default): within 2 points of the best "
            "adapter in every protocol",
            "i.i.d. B=64 38.1, continual 38.8, Dirichlet(0.1) 43.7, mixed 51.0, N=1 37.6",
            {"window": 1000.0, "window_min": 100.0, "d0": 0.02},
        ),
        "short_streams": Preset(
            "streams of a few hundred to a few thousand images (a new stream starts as AdaBN "
            "with a 64-image prior); on long label-correlated streams up to 0.7 behind gated",
            "i.i.d. B=64 37.3, continual 38.7, Dirichlet(0.1) 43.9, mixed 50.9, N=1 37.3; "
            "200 images per corruption: i.i.d. 41.4, Dirichlet(0.1) 43.6 (gated 53.4, 51.8)",
            {"window": 1000.0, "window_min": 100.0, "d0": 0.02, "pooled_prior_images": 64.0},
        ),
    },
    "gated": {RECOMMENDED: _GATED, PAPER: _GATED},
    "unmix_tns": {
        RECOMMENDED: Preset(
            "label-correlated streams: components start at the source (an extension)",
            "Dirichlet(0.1) 42.0, i.i.d. B=64 50.3 (reduced), N=1 50.6 (reduced)",
            {"alpha_init": 0.0},
        ),
        PAPER: Preset(
            "long label-correlated streams (thousands of images), as in the paper",
            "Dirichlet(0.1) 48.0, i.i.d. B=64 48.1, N=1 63.0 (reduced)",
        ),
        "paper_mixed": Preset(
            "mixed domains, the paper's setting for them (K=128)",
            "mixed 53.7, i.i.d. B=64 50.4",
            {"components": 128},
        ),
    },
    "momentum": {
        RECOMMENDED: _MOMENTUM,
        PAPER: _MOMENTUM,
        "batched": Preset(
            "label-correlated streams sent in batches of about 64",
            "Dirichlet(0.1) 43.1, i.i.d. B=64 39.7, N=1 51.1 (reduced)",
            {"batch_ref": 64.0},
        ),
    },
}


def preset_config(
    adapter: str, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The config of ``adapter``'s ``preset`` (default: recommended), updated by ``overrides``.

    Raises UnknownPresetError listing the adapter's presets. An adapter without presets (none
    registered here) takes ``overrides`` as they are.

    Example:
        >>> preset_config("adabn")
        {'prior_images': 64.0}
        >>> preset_config("adabn", "paper", {"window": 512})
        {'window': 512}
    """
    presets = PRESETS.get(adapter, {})
    name = preset or RECOMMENDED
    if name not in presets and (presets or preset is not None):
        raise UnknownPresetError(adapter, name, sorted(presets))
    base = presets[name].config if name in presets else {}
    return {**base, **(overrides or {})}
