"""Divergence-gated momentum (adapters/gated.py) against closed forms and pixel references."""

from __future__ import annotations

import pytest
import torch

from adapters.base import SourceStats
from adapters.drift import gaussian_distances
from engine.core import Engine
from tests.adapters.conftest import images, tiny_net
from tests.adapters.test_oracles import (
    layer_engine,
    layer_input,
    layer_output,
    layer_state,
    one_layer,
)


def pixels(x: torch.Tensor) -> torch.Tensor:
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


def test_zero_momentum_is_the_source_model() -> None:
    net = tiny_net()
    engine = Engine(net, num_classes=5)
    stream = engine.open_stream("gated", {"eta_min": 0.0, "eta_max": 1e-12})
    for seed in range(3):
        x = images(4, seed, shift=1.0)
        torch.testing.assert_close(engine.forward(x, [(stream, 4)]).logits, net(x).detach())


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1, 1], [3, 1, 2], [6]])
def test_fixed_momentum_pools_the_images_exactly(sizes: list[int]) -> None:
    """eta_min = eta_max = e: an EMA whose batch b weighs a_b; the statistics are the source with
    weight w plus the weighted pixel moments of the batches, between-image spread included."""
    e = 0.2
    net = one_layer()
    bn = net[0]
    engine = Engine(net, num_classes=4 * 8 * 8)
    stream = engine.open_stream("gated", {"eta_min": e, "eta_max": e})
    batches, w = [], 1.0
    for step, n in enumerate(sizes):
        x = layer_input(n, step, shift=0.4 * step)
        keep = (1 - e) ** n
        batches = [(a * keep, p) for a, p in batches] + [(1 - keep, pixels(x))]
        w *= keep
        out = layer_output(engine, x, stream)
    t = 1 - w
    mu_t = sum(a * p.mean(1) for a, p in batches) / t
    var_t = sum(a * (p - mu_t[:, None]).square().mean(1) for a, p in batches) / t
    mean = w * bn.running_mean.double() + t * mu_t
    var = w * bn.running_var.double() + t * var_t
    y = (x.double() - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    expected = (y * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]).float()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_gate_follows_the_jeffreys_divergence_of_the_drift_observer() -> None:
    """First batch: recent = linear mix of source and batch, running = source; the momentum is
    eta_max D / (D + d0) with D the channel mean of drift.py's Jeffreys divergence."""
    eta_max, d0, recent, n = 0.3, 0.5, 4.0, 3
    engine = layer_engine()
    source: SourceStats = engine.layers[0].source
    stream = engine.open_stream(
        "gated", {"eta_min": 0.0, "eta_max": eta_max, "d0": d0, "recent_images": recent}
    )
    x = layer_input(n, 0, shift=1.0)
    layer_output(engine, x, stream)
    p = pixels(x)
    a = 1 - (1 - 1 / recent) ** n
    mu_r = (1 - a) * source.mean.double() + a * p.mean(1)
    var_r = (1 - a) * source.var.double() + a * p.var(1, unbiased=False)
    d = gaussian_distances(mu_r, var_r, source)["jeffreys"].mean()
    eta = eta_max * d / (d + d0)
    torch.testing.assert_close(
        layer_state(engine, stream, "w"), ((1 - eta) ** n).double(), rtol=1e-6, atol=0
    )


def test_momentum_rises_on_a_domain_switch_and_falls_when_stable() -> None:
    engine = layer_engine()
    stream = engine.open_stream("gated")

    def eta_of(x: torch.Tensor) -> float:
        before = layer_state(engine, stream, "w").clone()
        layer_output(engine, x, stream)
        return 1 - (layer_state(engine, stream, "w") / before).item() ** (1 / x.shape[0])

    etas = [eta_of(layer_input(16, step, shift=1.0)) for step in range(40)]
    switched = eta_of(layer_input(16, 99, shift=-1.0))
    assert etas[-1] < etas[0] / 3  # settled in the stable domain
    assert switched > 3 * etas[-1]  # woke up on the switch
