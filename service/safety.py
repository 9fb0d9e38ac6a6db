"""Stream safety: when to auto-reset a stream, and which of its states were good.

Adapted statistics can go wrong without anyone noticing: under label shift or over long streams
the predictions collapse (one class everywhere, entropy near zero), or the stream moves to a new
domain and its statistics describe the old one. :class:`AutoResetPolicy` says when a stream's
last drift summary (``adapters.drift.drift_summaries``) shows it, and :class:`Watch` is what a
stream remembers between checks. Pure functions of the summary: the server checks after each
adapted forward, ``bench.accuracy`` runs the same check offline (docs/safety.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RESET_REASONS = ("entropy_collapse", "dominant_class", "confidence_collapse", "drift_jump")
RESET_ACTIONS = ("reset", "rollback")


class AutoResetPolicy(BaseModel):
    """When to give a stream its initial state back (or its last good snapshot).

    Every check needs ``min_images`` images in the drift observer's window since the last
    reset: over fewer, the prediction statistics are too noisy to tell. A threshold of 0 (or
    None for ``drift_jump``) turns its check off.
    """

    model_config = ConfigDict(extra="forbid")

    action: Literal["reset", "rollback"] = Field(
        default="reset",
        description="reset: the initial state; rollback: the last good snapshot (reset if none)",
    )
    min_images: int = Field(default=256, ge=1, le=1_000_000, description="images before any check")
    entropy_low: float = Field(
        default=0.05, ge=0, le=1, description="collapse if the normalised entropy falls below this"
    )
    dominant_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="collapse if one class's share of predictions exceeds this",
    )
    confidence_low: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="collapse if the mean top-1 probability falls below this",
    )
    drift_jump: float | None = Field(
        default=None,
        gt=1,
        le=1000,
        description="reset if the early-layer drift exceeds this many times its running baseline",
    )
    drift_floor: float = Field(
        default=0.05, ge=0, description="drift below this never counts as a jump (clean streams)"
    )


RECOMMENDED = AutoResetPolicy(
    action="reset",
    min_images=128,
    entropy_low=0.05,
    dominant_share=0.9,
    confidence_low=0.0,
    drift_jump=1.3,
)
"""The preset ``"auto_reset": "recommended"`` (measured in docs/safety.md)."""


def resolve_policy(value: AutoResetPolicy | str | dict[str, Any] | None) -> AutoResetPolicy | None:
    """The policy of a stream's ``auto_reset`` field: None (off), "recommended", or a config."""
    if value is None:
        return None
    if value == "recommended":
        return RECOMMENDED
    if isinstance(value, AutoResetPolicy):
        return value
    if isinstance(value, str):
        raise ValueError(f"unknown auto-reset preset {value!r}; valid: recommended")
    return AutoResetPolicy.model_validate(value)


BASELINE_WEIGHT = 0.1  # the drift baseline is an EMA over checks: a domain change stands out


@dataclass
class Watch:
    """What one stream's detector remembers between checks (in memory; starts fresh)."""

    baseline: float | None = None  # EMA of the early-layer drift since the last reset
    resets: int = 0
    last_reason: str | None = None
    last_reset_at: float | None = None  # unix time


def check(policy: AutoResetPolicy, summary: dict[str, Any], watch: Watch) -> str | None:
    """The reason to reset the stream after this summary (one of RESET_REASONS), or None.

    Updates ``watch.baseline`` when nothing fires. ``summary`` is a drift summary after the
    stream's last adapted batch.
    """
    images = summary.get("images") or 0.0
    if images < policy.min_images:
        return None
    entropy = summary.get("entropy_normalized")
    confidence = summary.get("confidence")
    dominant = summary.get("dominant_class_share")
    if entropy is not None and entropy < policy.entropy_low:
        return "entropy_collapse"
    if policy.dominant_share and dominant is not None and dominant > policy.dominant_share:
        return "dominant_class"
    if confidence is not None and confidence < policy.confidence_low:
        return "confidence_collapse"
    drift = float(summary.get("early", {}).get("jeffreys", 0.0))
    if not math.isfinite(drift):
        return None
    baseline = watch.baseline
    if (
        policy.drift_jump is not None
        and baseline is not None
        and drift > policy.drift_floor
        and drift > policy.drift_jump * max(baseline, policy.drift_floor)
    ):
        return "drift_jump"
    weight = 1.0 if baseline is None else BASELINE_WEIGHT
    watch.baseline = drift if baseline is None else baseline + weight * (drift - baseline)
    return None


@dataclass(frozen=True)
class SafetyLimits:
    """The server's bounds on the safety features (settings, docs/safety.md)."""

    idempotency_max_keys: int = 32
    idempotency_window_s: float = 3600.0
    feedback_window: int = 1000
    feedback_max_requests: int = 1000
    max_snapshots: int = 16
    snapshot_interval_images: int = 512


@dataclass(frozen=True)
class Snapshot:
    """A good state of a stream: its exported bytes (with the service metadata) and when."""

    samples: int
    taken_at: float  # unix time
    state: bytes
