"""The expression helpers of deploy/local.py (the processes are exercised by test_e2e.py)."""

from __future__ import annotations

import pytest

from deploy import local


def test_alert_conditions_become_bool_comparisons() -> None:
    assert local.bool_condition('up{job="tta-serve"} == 0') == '(up{job="tta-serve"}) == bool 0'
    assert local.bool_condition("tta:x:ratio > 0.25\n") == "(tta:x:ratio) > bool 0.25"
    assert local.bool_condition('sum(rate(x{a=~"5.."}[5m])) > 0') == (
        '(sum(rate(x{a=~"5.."}[5m]))) > bool 0'
    )


@pytest.mark.parametrize("expr", ["absent(up)", "up > on() other", "x > 1 and y"])
def test_other_alert_shapes_are_refused(expr: str) -> None:
    with pytest.raises(ValueError, match="not 'signal OP number'"):
        local.bool_condition(expr)


def test_every_alert_has_the_signal_op_number_shape() -> None:
    alerts = [e for e in local.rule_expressions() if e.source.startswith("alert ")]
    assert len(alerts) >= 14
    assert all(" bool " in alert.expr for alert in alerts)


def test_substitute_replaces_rate_interval_and_variables() -> None:
    expr = 'rate(x{model="$model", stream="$stream"}[$__rate_interval])'
    assert local.substitute(expr, {"model": "m", "stream": "s-1"}) == (
        'rate(x{model="m", stream="s-1"}[1m])'
    )


def test_dashboard_expressions_cover_panels_and_variables() -> None:
    sources = {expression.source for expression in local.dashboard_expressions()}
    assert "stream-detail.json / $stream" in sources
    assert "fleet-drift.json / Top-K streams" in sources
