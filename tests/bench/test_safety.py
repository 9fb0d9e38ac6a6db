"""The auto-reset hook of the accuracy benchmark (bench.safety measures it)."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from bench.accuracy import Pool, build_protocol, run_protocol, variant
from bench.safety import rows_for
from service.safety import AutoResetPolicy
from tests.bench.test_accuracy import DOMAINS, POOL_LABELS, _identity, _tiny_engine


def _pool() -> Pool:
    rng = np.random.default_rng(0)
    return Pool(
        torch.from_numpy(rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)),
        POOL_LABELS,
        DOMAINS,
        ("a", "b", "c"),
    )


def test_auto_reset_lanes_are_checked_after_every_batch() -> None:
    engine = _tiny_engine()
    pool = _pool()
    protocol = build_protocol("continual", DOMAINS, POOL_LABELS, seed=0, batch=32)
    plain = variant("adabn")
    always = dataclasses.replace(
        plain, label="always", auto_reset=AutoResetPolicy(entropy_low=1.0, min_images=32)
    )
    never = dataclasses.replace(
        plain, label="never", auto_reset=AutoResetPolicy(entropy_low=1.0, min_images=1_000_000)
    )
    resets: dict[str, int] = {}
    predictions = run_protocol(
        engine, _identity, pool, protocol, [plain, always, never], 1000, resets=resets
    )
    # every batch of 32 reaches min_images after the reset before it; a domain's last 4 do not
    full = sum(len(batch) == 32 for batch in protocol.streams[0])
    assert resets == {"always": full, "never": 0}
    assert np.array_equal(predictions["never"], predictions["adabn"])
    assert not np.array_equal(predictions["always"], predictions["adabn"])


def test_safety_rows_take_a_configured_variant_by_label() -> None:
    """``--adapters`` names a variant by its label, config included (the server's default)."""
    label = "balanced(window=1000.0, window_min=100.0, d0=0.02)"
    args = argparse.Namespace(adapters=[label], seed=0, batch=32, max_batch=1000)
    policies = {
        "always": AutoResetPolicy(entropy_low=1.0, min_images=32),
        "never": AutoResetPolicy(entropy_low=1.0, min_images=1_000_000),
    }
    rows = rows_for(_tiny_engine(), _identity, _pool(), "continual", args, policies)
    assert [row[:3] for row in rows] == [
        ["continual", label, "always"],
        ["continual", label, "never"],
    ]
    (_, _, _, off, never_with, never_change, never_resets) = rows[1]
    assert (never_with, never_change, never_resets) == (off, "+0.00", "0")
    assert int(rows[0][6]) > 0
