"""Class-balanced statistics (adapters/balanced.py) against references computed from the pixels."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from engine.core import Engine
from tests.adapters.test_oracles import layer_input, layer_output, one_layer

CHANNELS, SIZE = 4, 8
CLASSES = CHANNELS * SIZE * SIZE  # one_layer's "logits" are its flattened output
FAITHFUL = {"classes": CLASSES, "prior_images": 0.0, "window": 1e9}


def pixels(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [C, N*H*W] in float64."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


def balanced_reference(seen: dict[int, list[torch.Tensor]], bn) -> tuple[torch.Tensor, ...]:
    """The uniform mixture over all classes: pooled pixels of each predicted class, the source
    for a class never predicted; the mixture's mean and variance by weighting every pixel."""
    mu_s, var_s = bn.running_mean.double(), bn.running_var.double()
    means, variances = [], []
    for k in range(CLASSES):
        if k in seen:
            p = pixels(torch.cat(seen[k]))
            means.append(p.mean(1))
            variances.append(p.var(1, unbiased=False))
        else:
            means.append(mu_s)
            variances.append(var_s)
    m, v = torch.stack(means), torch.stack(variances)
    mean = m.mean(0)
    return mean, (v + (m - mean).square()).mean(0)


def apply_bn(bn, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    y = (x.double() - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    return (y * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]).float()


def test_normalise_then_update_with_the_forwards_own_predictions() -> None:
    """Each batch is normalised with the class statistics of the batches before it (the first
    with the source), and folded into the classes the same forward predicted."""
    net = one_layer(CHANNELS)
    bn = net[0]
    engine = Engine(net, num_classes=CLASSES)
    stream = engine.open_stream("balanced", FAITHFUL)
    seen: dict[int, list[torch.Tensor]] = {}
    for step, n in enumerate((5, 1, 7, 3)):
        x = layer_input(n, step, shift=0.7 * step)
        out = layer_output(engine, x, stream)
        if not seen:
            expected = net(x).detach().reshape(x.shape)
        else:
            expected = apply_bn(bn, x, *balanced_reference(seen, bn))
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        for image, label in zip(x, out.flatten(1).argmax(1).tolist(), strict=True):
            seen.setdefault(label, []).append(image[None])
    assert len(seen) > 1  # the test covers several classes


def test_class_frequencies_do_not_move_the_statistics() -> None:
    """Three times as many images of some classes give the same statistics (AdaBN's move)."""
    probe = layer_input(4, 9, shift=0.3)
    a = layer_input(2, 1, shift=1.5)
    b = layer_input(1, 2, shift=-1.0)
    outputs = {}
    for adapter, config in (("balanced", FAITHFUL), ("adabn", {})):
        engine = Engine(one_layer(CHANNELS), num_classes=CLASSES)
        once, thrice = engine.open_stream(adapter, config), engine.open_stream(adapter, config)
        labels_a = layer_output(engine, torch.cat([a, b]), once).flatten(1).argmax(1)
        layer_output(engine, torch.cat([a, a, a, b]), thrice)
        outputs[adapter] = [layer_output(engine, probe, s, adapt=False) for s in (once, thrice)]
        if adapter == "balanced":
            assert labels_a[2].item() not in labels_a[:2].tolist()  # b has a class of its own
    torch.testing.assert_close(*outputs["balanced"], atol=1e-5, rtol=1e-5)
    assert (outputs["adabn"][0] - outputs["adabn"][1]).abs().max() > 1e-2


def test_prior_and_window_per_class() -> None:
    """A class's weight on its target estimate is n / (n + n0 L); the window caps n."""
    engine = Engine(one_layer(CHANNELS), num_classes=CLASSES)
    stream = engine.open_stream("balanced", {"classes": CLASSES, "window": 3, "prior_images": 2})
    x = layer_input(1, 0, shift=1.0)
    for _ in range(5):
        label = layer_output(engine, x, stream).flatten(1).argmax(1).item()
    n = engine.pool_of(stream).layers[0]["n"][stream.slot]
    assert n[label].item() == 3 * SIZE * SIZE  # five images seen, three remembered
    assert n.sum().item() == n[label].item()


def pooled_reference(
    seen: dict[int, list[torch.Tensor]], batch: torch.Tensor, bn, n0: float, n0_pooled: float
) -> tuple[torch.Tensor, ...]:
    """The pooled prior from the pixels: every image seen and the batch, mixed with the source
    by c N / (N + n0' L), c the perplexity of the seen images' classes over K (1 before any);
    each class mixed with it by n_k / (n_k + n0 L); the uniform mixture of the classes."""
    mu_s, var_s = bn.running_mean.double(), bn.running_var.double()
    image = SIZE * SIZE
    everything = pixels(torch.cat([*(x for xs in seen.values() for x in xs), batch]))
    shares = torch.tensor([float(len(xs)) for xs in seen.values()]).double()
    shares /= shares.sum()
    coverage = (-(shares * shares.log()).sum()).exp() / CLASSES if seen else 1.0
    a = coverage * everything.shape[1] / (everything.shape[1] + n0_pooled * image)
    prior_mean = (1 - a) * mu_s + a * everything.mean(1)
    prior_var = (1 - a) * var_s + a * everything.var(1, unbiased=False)
    means, variances = [], []
    for k in range(CLASSES):
        p = pixels(torch.cat(seen[k])) if k in seen else torch.empty(CHANNELS, 0).double()
        w = p.shape[1] / (p.shape[1] + n0 * image)
        mean_k = p.mean(1) if k in seen else prior_mean
        var_k = p.var(1, unbiased=False) if k in seen else prior_var
        means.append((1 - w) * prior_mean + w * mean_k)
        variances.append((1 - w) * prior_var + w * var_k)
    m, v = torch.stack(means), torch.stack(variances)
    mean = m.mean(0)
    return mean, (v + (m - mean).square()).mean(0)


def test_pooled_prior_from_the_pixels() -> None:
    """With ``pooled_prior_images`` a class's prior is the stream's pooled statistic (every image
    remembered and the current batch, with its own source prior, scaled by how evenly the
    remembered images cover the classes), not the source."""
    net = one_layer(CHANNELS)
    engine = Engine(net, num_classes=CLASSES)
    config = {**FAITHFUL, "prior_images": 2.0, "pooled_prior_images": 3.0}
    stream = engine.open_stream("balanced", config)
    seen: dict[int, list[torch.Tensor]] = {}
    for step, n in enumerate((5, 1, 7, 3)):
        x = layer_input(n, step, shift=0.7 * step)
        out = layer_output(engine, x, stream)
        expected = apply_bn(net[0], x, *pooled_reference(seen, x, net[0], 2.0, 3.0))
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        for image, label in zip(x, out.flatten(1).argmax(1).tolist(), strict=True):
            seen.setdefault(label, []).append(image[None])
    assert 1 < len(seen) < CLASSES  # classes with images of their own, coverage below 1


@pytest.mark.parametrize("n0", [0.0, 16.0])
def test_pooled_prior_starts_a_stream_as_adabn(n0: float) -> None:
    """A fresh stream's first batch is normalised as AdaBN with an n0'-image source prior
    normalises it (the batch is the pooled statistic; no class has an image yet)."""
    engine = Engine(one_layer(CHANNELS), num_classes=CLASSES)
    balanced = engine.open_stream("balanced", {**FAITHFUL, "pooled_prior_images": n0})
    adabn = engine.open_stream("adabn", {"prior_images": n0})
    x = layer_input(6, 0, shift=0.7)
    torch.testing.assert_close(layer_output(engine, x, balanced), layer_output(engine, x, adabn))


@pytest.mark.parametrize("n0", [0.0, 16.0])
def test_one_class_with_a_pooled_prior_is_adabn(n0: float) -> None:
    """With K = 1 the classes cover themselves (coverage 1) and a class that never outweighs its
    prior (n0 huge) leaves the pooled statistic: AdaBN with an n0'-image source prior, update
    then normalise, at every step (N = 1 included)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*one_layer(CHANNELS), torch.nn.Linear(CLASSES, 1)).eval()
    engine = Engine(net, num_classes=1)
    config = {"prior_images": 1e9, "window": 1e9, "pooled_prior_images": n0}
    balanced = engine.open_stream("balanced", config)
    adabn = engine.open_stream("adabn", {"prior_images": n0})
    for step, n in enumerate((1, 6, 1, 3)):
        x = layer_input(n, step, shift=0.7 * step)
        expected = engine.forward(x, [(adabn, n)]).logits
        torch.testing.assert_close(engine.forward(x, [(balanced, n)]).logits, expected)


class SignOfChannel0(torch.nn.Module):
    """A BatchNorm layer whose output does not decide the class: the class is the sign of
    channel 0's mean in the raw input (0 if positive), so every image's label is known."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = one_layer(CHANNELS)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x[:, 0].mean((1, 2))
        return torch.stack([side, -side], 1) + 0 * self.bn(x).mean((1, 2, 3))[:, None]


@pytest.mark.parametrize("window_min", [2.0, None])
def test_gated_window_ignores_label_shift_and_shortens_on_a_domain_switch(
    window_min: float | None,
) -> None:
    """window = window_min + (window - window_min) d0 / (D + d0), D the divergence between the
    recent images and the mixture of the classes they were predicted as. Two fixed images, one
    per class, in runs of one class (label shift): the recent images are exactly their classes'
    mixture, D = 0 and each class keeps its full window. The same images shifted (a new domain):
    D is large and every class's memory drops to window_min at once (None: the window stays)."""
    engine = Engine(SignOfChannel0(), num_classes=2)
    config = {"window": 5, "window_min": window_min, "d0": 1e-9, "prior_images": 0}
    stream = engine.open_stream("balanced", config)
    a, b = layer_input(1, 0, shift=1.0), -layer_input(1, 1, shift=1.0)
    assert a[:, 0].mean() > 0 > b[:, 0].mean()  # class 0, class 1
    for x in [a, b, a, b] + [a] * 4 + [b] * 4:  # six images of each class, in runs
        engine.forward(x, [(stream, 1)])
    image = SIZE * SIZE
    n = engine.pool_of(stream).layers[0]["n"][stream.slot]
    torch.testing.assert_close(n, torch.full_like(n, 5.0 * image))

    engine.forward(a + 3.0, [(stream, 1)])  # a new domain, still class 0
    n = engine.pool_of(stream).layers[0]["n"][stream.slot]
    remembered = 5.0 if window_min is None else window_min
    torch.testing.assert_close(n, torch.full_like(n, remembered * image), rtol=1e-4, atol=0)


def test_single_class_is_adabn_one_batch_late() -> None:
    """With K = 1 (a one-logit model) the balanced statistic is the stream's pooled statistic
    (AdaBN) of the batches before the current one, at N = 1 included (between-image variance
    kept). The logit is a random linear map of the normalised layer: equal logits, equal
    normalisation."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*one_layer(CHANNELS), torch.nn.Linear(CLASSES, 1)).eval()
    engine = Engine(net, num_classes=1)
    balanced = engine.open_stream("balanced", {"prior_images": 0, "window": 1e9})
    assert balanced.config.classes == 1  # the model's
    adabn = engine.open_stream("adabn")
    for step in range(4):
        x = layer_input(1, step, shift=0.5 * step)
        out = engine.forward(x, [(balanced, 1)]).logits
        if step:
            torch.testing.assert_close(out, engine.forward(x, [(adabn, 1)], adapt=False).logits)
        engine.forward(x, [(adabn, 1)])


def test_classes_are_the_models() -> None:
    """K defaults to the model's number of classes; another K is refused (labels beyond it
    would be folded into the wrong class)."""
    engine = Engine(one_layer(CHANNELS), num_classes=CLASSES)
    assert engine.open_stream("balanced").config.classes == CLASSES
    with pytest.raises(ValidationError, match=f"the model has {CLASSES} classes, not 10"):
        engine.open_stream("balanced", {"classes": 10})
