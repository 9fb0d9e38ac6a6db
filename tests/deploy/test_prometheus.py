"""The Prometheus config and rules of deploy/prometheus, checked by promtool (Debian `prometheus`).

`promtool check config` and `check rules` validate the files; `promtool test rules` runs the unit
tests of deploy/prometheus/tests, and a test here checks that those make every alert both fire
and stay silent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail (never skip) with the install command when it is missing."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool not found: install the Debian package with `apt-get install -y prometheus`"
        )
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def alert_names() -> set[str]:
    """Every alert of the rule files."""
    return {
        rule["alert"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_config_is_valid() -> None:
    result = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # the config loads every rule file (its rule_files glob matched them all)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert alert_names() - firing == set(), "alerts never tested firing"
    assert alert_names() - silent == set(), "alerts never tested silent"


def test_every_alert_documents_threshold_and_runbook() -> None:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    annotations = rule["annotations"]
                    assert {"summary", "threshold", "runbook"} <= annotations.keys(), rule["alert"]
                    assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]


def test_thresholds_named_in_annotations_are_the_settings_defaults() -> None:
    named = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                text = rule.get("annotations", {}).get("threshold", "")
                named += re.findall(r"TTA_(\w+) \(default ([\d.]+)\)", text)
    assert len(named) >= 4
    for setting, default in named:
        assert Settings.model_fields[setting.lower()].default == float(default), setting
