"""Closed-form oracles of every adapter (ALGORITHMS.md section 11)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adapters.drift import gaussian_distances
from engine.core import Engine
from engine.network import instance_moments
from tests.adapters.conftest import images, tiny_net


def one_layer(channels: int = 4, seed: int = 0) -> nn.Module:
    """A network that is a single BatchNorm2d (output flattened) with random source statistics."""
    bn = nn.BatchNorm2d(channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=generator))
    return nn.Sequential(bn, nn.Flatten()).eval()


def layer_engine(channels: int = 4, size: int = 8) -> Engine:
    """An engine over one_layer(): its 'logits' are the flattened BN output."""
    return Engine(one_layer(channels), num_classes=channels * size * size)


def layer_input(n: int, seed: int, shift: float = 0.0, size: int = 8, channels: int = 4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, channels, size, size), generator=generator) * (1 + shift) + shift


def layer_output(engine: Engine, x: torch.Tensor, stream, **kwargs) -> torch.Tensor:
    return engine.forward(x, [(stream, x.shape[0])], **kwargs).logits.reshape(x.shape)


def layer_state(engine: Engine, stream, name: str) -> torch.Tensor:
    return engine.pool_of(stream).layers[0][name][stream.slot]


# --- source equivalence --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "config"),
    [("source", {}), ("alpha_bn", {"alpha": 0.0}), ("momentum", {"eta0": 0.0})],
)
def test_source_equivalence(adapter: str, config: dict) -> None:
    """alpha = 0 and eta_0 = 0 are the unmodified eval-mode model, batch after batch."""
    net = tiny_net()
    engine = Engine(net, num_classes=5)
    stream = engine.open_stream(adapter, config)
    for seed in range(3):
        x = images(7, seed, shift=1.0)
        torch.testing.assert_close(engine.forward(x, [(stream, 7)]).logits, net(x).detach())


def test_adabn_large_prior_approaches_the_source() -> None:
    """AdaBN with prior n0 -> infinity is the source model (a limit: large n0, small tolerance)."""
    net = tiny_net()
    engine = Engine(net, num_classes=5)
    stream = engine.open_stream("adabn", {"prior_images": 1e9})
    x = images(6, 0, shift=1.0)
    torch.testing.assert_close(
        engine.forward(x, [(stream, 6)]).logits, net(x).detach(), atol=1e-4, rtol=0
    )


def test_plain_forward_is_the_source_model() -> None:
    net = tiny_net()
    engine = Engine(net, num_classes=5)
    x = images(5, 0, shift=0.5)
    torch.testing.assert_close(engine.forward_source(x), net(x).detach())


# --- TBN equivalence -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "config"), [("tbn", {}), ("adabn", {}), ("alpha_bn", {"alpha": 1.0})]
)
def test_first_batch_is_train_mode_batchnorm(adapter: str, config: dict) -> None:
    """TBN, AdaBN on a fresh state and alpha-BN(1) give train-mode BN output (biased variance)."""
    net = tiny_net()
    train_mode = tiny_net()
    for module in train_mode.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
    engine = Engine(net, num_classes=5)
    stream = engine.open_stream(adapter, config)
    x = images(9, 0, shift=2.0)
    with torch.no_grad():
        expected = train_mode(x)
    torch.testing.assert_close(
        engine.forward(x, [(stream, 9)]).logits, expected, rtol=1e-4, atol=1e-5
    )


def test_alpha_bn_unbiased_variance_is_tta_libs() -> None:
    """unbiased=True mixes the variance times NL / (NL - 1), as TTA-LIB's inner BatchNorm2d does."""
    engine = layer_engine(size=2)
    biased = engine.open_stream("alpha_bn", {"alpha": 1.0})
    unbiased = engine.open_stream("alpha_bn", {"alpha": 1.0, "unbiased": True})
    x = layer_input(1, 0, size=2)  # N*L = 4: a visible factor 4/3
    bn = engine.layers[0]
    std = x.var((0, 2, 3), unbiased=True).add(bn.source.eps).sqrt()
    expected = (x - x.mean((0, 2, 3))[None, :, None, None]) / std[None, :, None, None]
    expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(layer_output(engine, x, unbiased), expected.detach())
    assert not torch.allclose(layer_output(engine, x, biased), expected.detach(), atol=1e-3)


# --- AdaBN partition invariance ------------------------------------------------------------------


@pytest.mark.parametrize("split", [[1] * 12, [5, 7], [3, 1, 8], [2, 2, 2, 6]])
def test_adabn_partition_invariance(split: list[int]) -> None:
    """One layer: the statistics after any split into batches equal those of one big batch.

    Against the one-batch state to fp64 tolerance (the per-image fp32 moments are the same in
    every split), and against float64 statistics of the pixels to fp32 tolerance.
    """
    engine = layer_engine()
    x = layer_input(12, 7, shift=3.0) * torch.tensor([1, 2, 3, 4.0])[:, None, None]
    x = x + torch.tensor([0.0, 50.0, -20.0, 1000.0])[:, None, None]  # large offsets
    whole, stream = engine.open_stream("adabn"), engine.open_stream("adabn")
    engine.forward(x, [(whole, 12)])
    start = 0
    for n in split:
        engine.forward(x[start : start + n], [(stream, n)])
        start += n
    for name in ("n", "mean", "m2"):
        got, expected = layer_state(engine, stream, name), layer_state(engine, whole, name)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    pixels = x.double().transpose(0, 1).reshape(4, -1)
    n_total = layer_state(engine, stream, "n")
    assert float(n_total) == pixels.shape[1]
    mean, var = layer_state(engine, stream, "mean"), layer_state(engine, stream, "m2") / n_total
    torch.testing.assert_close(mean, pixels.mean(1), rtol=1e-7, atol=1e-7)
    # fp32 raw moments: channel 3 sits ~60 std from the source mean (error ~1e-7 * 60^2).
    torch.testing.assert_close(var, pixels.var(1, unbiased=False), rtol=1e-3, atol=1e-7)


def test_adabn_partition_invariance_fails_for_deep_layers() -> None:
    """Deeper layers see inputs normalised with split-dependent statistics: it must fail."""
    net = tiny_net()
    whole, pieces = Engine(net, num_classes=5), Engine(net, num_classes=5)
    a, b = whole.open_stream("adabn"), pieces.open_stream("adabn")
    x = images(8, 0, shift=1.0)
    whole.forward(x, [(a, 8)])
    for i in range(8):
        pieces.forward(x[i : i + 1], [(b, 1)])
    first_a, first_b = whole.pool_of(a).layers[0], pieces.pool_of(b).layers[0]
    torch.testing.assert_close(first_a["mean"][a.slot], first_b["mean"][b.slot])
    last_a, last_b = whole.pool_of(a).layers[-1], pieces.pool_of(b).layers[-1]
    assert not torch.allclose(last_a["mean"][a.slot], last_b["mean"][b.slot], atol=1e-4)


def test_adabn_window_caps_the_count() -> None:
    """With a window of W images the count stops at W * L and older batches fade geometrically."""
    engine = layer_engine()
    stream = engine.open_stream("adabn", {"window": 4})
    for seed in range(5):
        engine.forward(layer_input(2, seed), [(stream, 2)])
    assert float(layer_state(engine, stream, "n")) == pytest.approx(4 * 64)


def test_instance_moments_survive_large_offsets() -> None:
    """|mean| >> std cancels raw fp32 second moments; the shift by the source mean prevents it."""
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.01 + 1e3
    exact = x.double().var((2, 3), unbiased=False)
    _, var = instance_moments(x, torch.full((2,), 1e3))
    torch.testing.assert_close(var.double(), exact, rtol=1e-3, atol=0)
    # Unshifted, the relative error is about 1e-7 (mean/std)^2: 1e-4 at mean/std = 30.
    y = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(1)) + 30.0
    mean, var = instance_moments(y, torch.zeros(2))
    torch.testing.assert_close(
        var.double(), y.double().var((2, 3), unbiased=False), rtol=1e-3, atol=0
    )
    torch.testing.assert_close(mean.double(), y.double().mean((2, 3)))
    _, var = instance_moments(x, torch.zeros(2))
    assert bool((var >= 0).all())


# --- UnMix-TNS -----------------------------------------------------------------------------------


def test_unmix_k1_is_instance_norm_and_an_ema_of_instance_statistics() -> None:
    engine = layer_engine()
    bn = engine.layers[0]
    stream = engine.open_stream("unmix_tns", {"components": 1, "batch_size_max": 64})
    x = layer_input(5, 0, shift=1.0)
    out = layer_output(engine, x, stream)
    var, mean = torch.var_mean(x, (2, 3), correction=0, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + bn.source.eps) * bn.weight[:, None, None] + bn.bias[
        :, None, None
    ]
    torch.testing.assert_close(out, expected.detach(), rtol=1e-4, atol=1e-4)
    lam = 1 - 0.9 ** (5 / 64)
    expected_mean = (1 - lam) * bn.source.mean + lam * mean.flatten(1).mean(0)
    torch.testing.assert_close(layer_state(engine, stream, "means")[0], expected_mean)


def test_unmix_output_of_an_image_does_not_depend_on_the_batch() -> None:
    net = tiny_net()
    engine = Engine(net, num_classes=5)
    config = {"seed": 3}
    x = images(6, 0, shift=0.7)
    reference = engine.open_stream("unmix_tns", config)
    together = engine.forward(x, [(reference, 6)], adapt=False).logits
    for perm in ([5, 4, 3, 2, 1, 0], [2], [0, 3]):
        probe = engine.open_stream("unmix_tns", config)
        got = engine.forward(
            x[perm], [(probe, len(perm))]
        ).logits  # adapting: state changes only after
        torch.testing.assert_close(got, together[perm], rtol=1e-5, atol=1e-5)
        engine.close_stream(probe)


def test_unmix_initial_mixture_matches_the_source() -> None:
    """For large K the uniform mixture of the initial components has the source moments."""
    engine = layer_engine(channels=64)
    stream = engine.open_stream("unmix_tns", {"components": 512, "seed": 1})
    means = layer_state(engine, stream, "means").double()
    variances = layer_state(engine, stream, "vars").double()
    source = engine.sources[0]
    mixture_mean = means.mean(0)
    mixture_var = variances.mean(0) + means.var(0, unbiased=False)
    torch.testing.assert_close(mixture_mean, source.mean.double(), atol=0.15, rtol=0)
    ratio = mixture_var / source.var.double()
    assert (
        float((ratio - 1).abs().mean()) < 0.05
    )  # chi-square(511)/511 fluctuates by ~6 % per channel


def test_unmix_k1_initial_state_is_the_source_exactly() -> None:
    engine = layer_engine()
    stream = engine.open_stream("unmix_tns", {"components": 1})
    torch.testing.assert_close(layer_state(engine, stream, "means")[0], engine.sources[0].mean)
    torch.testing.assert_close(layer_state(engine, stream, "vars")[0], engine.sources[0].var)


# --- momentum (EMD) ------------------------------------------------------------------------------


def test_momentum_source_weight_after_50_steps() -> None:
    """prod_{t=0..49} (1 - 0.1 exp(-0.08 t)) = 0.2692: t counted from 0, one image per step."""
    engine = layer_engine()
    stream = engine.open_stream("momentum", {"batch_ref": 1.0})
    for seed in range(50):
        engine.forward(layer_input(1, seed), [(stream, 1)])
    expected = math.prod(1 - 0.1 * math.exp(-0.08 * t) for t in range(50))
    assert expected == pytest.approx(0.2692, abs=1e-4)
    assert float(layer_state(engine, stream, "w")) == pytest.approx(expected, rel=1e-12)
    assert float(layer_state(engine, stream, "step")) == 50


@pytest.mark.parametrize("batch_ref", [1.0, 6.0, 64.0])
def test_momentum_schedule_does_not_depend_on_batching(batch_ref: float) -> None:
    """64 images as one batch, as 8 batches of 8 or one by one: the same source weight and step."""
    engine = layer_engine()
    config = {"batch_ref": batch_ref}
    x = layer_input(64, 0)
    streams = []
    for size in (64, 8, 1):
        stream = engine.open_stream("momentum", config)
        for start in range(0, 64, size):
            engine.forward(x[start : start + size], [(stream, size)])
        streams.append(stream)
    weights = [float(layer_state(engine, s, "w")) for s in streams]
    assert weights == pytest.approx([weights[0]] * 3, rel=1e-12)
    expected = math.prod(
        (1 - 0.1 * math.exp(-0.08 * i / batch_ref)) ** (1 / batch_ref) for i in range(64)
    )
    assert weights[0] == pytest.approx(expected, rel=1e-12)


def test_momentum_mean_is_the_papers_ema() -> None:
    """One image per step (batch_ref = 1): the mean is the paper's EMA of the step means."""
    engine = layer_engine()
    stream = engine.open_stream("momentum", {"batch_ref": 1.0})
    source = engine.sources[0]
    ema = source.mean.double().clone()
    for t in range(6):
        x = layer_input(1, t, shift=float(t))
        engine.forward(x, [(stream, 1)])
        eta = 0.1 * math.exp(-0.08 * t)
        ema = (1 - eta) * ema + eta * x.double().mean((0, 2, 3))
    state = engine.pool_of(stream).layers[0]
    torch.testing.assert_close(source.mean.double() + state["s1"][stream.slot], ema)


# --- drift measures ------------------------------------------------------------------------------


def test_drift_measures_are_zero_at_the_source_and_nonnegative() -> None:
    stats = layer_engine(channels=32).sources[0]
    same = gaussian_distances(stats.mean.double(), stats.var.double(), stats)
    for name in ("kl", "jeffreys", "w2", "w2n", "hellinger"):
        torch.testing.assert_close(same[name], torch.zeros_like(same[name]), atol=1e-12, rtol=0)
    generator = torch.Generator().manual_seed(0)
    mu_t = torch.randn(32, generator=generator, dtype=torch.float64) * 3
    var_t = torch.rand(32, generator=generator, dtype=torch.float64) * 5
    far = gaussian_distances(mu_t, var_t, stats)
    for name in ("kl", "jeffreys", "w2"):
        assert bool((far[name] >= 0).all())
    assert bool(((far["hellinger"] >= 0) & (far["hellinger"] <= 1)).all())


def test_drift_closed_forms() -> None:
    """Hand-computed values for one channel: N(1, 4) against the source N(0, 1)."""
    stats = layer_engine(channels=1).sources[0]
    object.__setattr__(stats, "mean", torch.zeros(1))
    object.__setattr__(stats, "var", torch.ones(1) - stats.eps)
    d = gaussian_distances(
        torch.ones(1, dtype=torch.float64),
        torch.full((1,), 4.0 - stats.eps, dtype=torch.float64),
        stats,
    )
    assert float(d["kl"]) == pytest.approx(0.5 * (4 + 1 - 1 + math.log(1 / 4)))
    assert float(d["jeffreys"]) == pytest.approx(0.5 * (4 + 0.25 - 2 + 1 * (1 + 0.25)))
    assert float(d["w2"]) == pytest.approx(1 + 1)
    bc = 1 / (4 * 5) + 0.5 * math.log(5 / (2 * 2))
    assert float(d["hellinger"]) == pytest.approx(1 - math.exp(-bc))


def test_kl_matches_monte_carlo() -> None:
    stats = layer_engine(channels=1).sources[0]
    mu_t, var_t = torch.tensor([0.7], dtype=torch.float64), torch.tensor([2.5], dtype=torch.float64)
    kl = float(gaussian_distances(mu_t, var_t, stats)["kl"])
    v_s = stats.var.double() + stats.eps
    v_t = var_t + stats.eps
    p = torch.distributions.Normal(mu_t, v_t.sqrt())
    q = torch.distributions.Normal(stats.mean.double(), v_s.sqrt())
    torch.manual_seed(0)
    samples = p.sample((400_000,))
    estimate = float((p.log_prob(samples) - q.log_prob(samples)).mean())
    assert estimate == pytest.approx(kl, abs=0.01)
