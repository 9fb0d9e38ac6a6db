"""bench/reliability.py in a tiny configuration, with real processes, so that it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.reliability import crash, main, redis_outage
from bench.report import read_section


@pytest.fixture(autouse=True)
def weights(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    """The server processes read the seeded weights cache."""
    monkeypatch.setenv("TTA_MODEL_CACHE_DIR", str(model_cache))


def test_a_kill_loses_no_acknowledged_update_with_sync(tmp_path: Path) -> None:
    result = crash("sync", tmp_path, kills=1, seconds=1.0, streams=2, images=4)
    assert result.durability == "sync" and len(result.lost_per_kill) == 1
    assert result.acknowledged > 0 and result.statuses[200] * 4 == result.acknowledged
    assert result.lost_per_kill == [0]
    assert not [s for s in result.statuses if s >= 500]


def test_soak_command_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "reliability.md"
    main(["soak", "--minutes", "0.05", "--clients", "2", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Reliability\n")
    section = read_section(out, "bench.reliability:soak")
    assert section is not None and section.startswith("## Soak\n")
    assert "; 5xx: 0; wrong answers to invalid requests" in section
    assert "(a 2xx or 5xx, shown as 1000 + status): 0; no answer: 0." in section


@pytest.mark.slow
def test_interval_kill_and_redis_outage(tmp_path: Path) -> None:
    """The other two measurements: interval durability may lose, a Redis outage may not."""
    interval = crash("interval", tmp_path, kills=1, seconds=1.0, streams=2, images=4)
    assert interval.acknowledged > 0 and len(interval.lost_per_kill) == 1
    outage = redis_outage(tmp_path, before_s=1.0, outage_s=2.0, after_s=2.0, streams=2)
    assert outage.lost == 0 and outage.acknowledged > 0
    assert outage.phases["before"].statuses.keys() <= {200}
    assert outage.phases["during"].server_errors() == outage.phases["during"].statuses[503]
    assert outage.phases["after"].statuses[200] > 0
    assert outage.not_ready_after_s is not None and outage.ready_again_after_s is not None
