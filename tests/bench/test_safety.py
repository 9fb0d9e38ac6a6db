"""The auto-reset hook of the accuracy benchmark (bench.safety measures it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bench.accuracy import Pool, build_protocol, run_protocol, variant
from service.safety import AutoResetPolicy
from tests.bench.test_accuracy import DOMAINS, POOL_LABELS, _identity, _tiny_engine


def test_auto_reset_lanes_are_checked_after_every_batch() -> None:
    engine = _tiny_engine()
    rng = np.random.default_rng(0)
    pool = Pool(
        torch.from_numpy(rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)),
        POOL_LABELS,
        DOMAINS,
        ("a", "b", "c"),
    )
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
