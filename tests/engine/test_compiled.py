"""The compiled adapted forward (engine/compiled.py): the eager engine's results, bucketed.

Every test compares a compiled engine with an eager one over the same network, call by call:
logits, refusals and every state tensor. The networks are small (inductor's CPU backend
compiles each bucket layout in seconds to minutes on a loaded machine): the fast test uses one
adapter and one layout; the matrix of every adapter and mixed batches is marked slow.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from adapters import ADAPTERS
from engine import Engine, StreamHandle
from engine.compiled import CompiledStep
from engine.core import _static_copy
from tests.adapters.conftest import images, tiny_net

NAMES = sorted(ADAPTERS)
# Compiling takes minutes on a loaded 2-core machine: each compiling test may take 20.
COMPILES = pytest.mark.timeout(1200)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # as the CPU/GPU parity tests
SHAPE = (3, 8, 8)  # one image of the tests' networks


def two_layer_net(seed: int = 0) -> nn.Module:
    """conv-BN-ReLU twice, pool, linear: the smallest network with coupled BN layers."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(4, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(4, generator=generator) + 0.5)
    return net.eval()


def assert_same_states(eager: Engine, compiled: Engine, pairs: list[tuple[StreamHandle, ...]]):
    """Every state tensor of every stream equal in both engines."""
    for reference, stream in pairs:
        expected, got = eager.pool_of(reference), compiled.pool_of(stream)
        for want, have in zip(expected.layers, got.layers, strict=True):
            for key in want:
                torch.testing.assert_close(
                    have[key][stream.slot].cpu(), want[key][reference.slot].cpu(), **TOLERANCE
                )
        for key in expected.head:
            torch.testing.assert_close(
                got.head[key][stream.slot].cpu(),
                expected.head[key][reference.slot].cpu(),
                **TOLERANCE,
            )


def check_calls(
    net: nn.Module,
    streams: list[tuple[str, dict]],
    calls: list[tuple[list[int], list[bool], Tensor]],
    **compiled_options,
) -> Engine:
    """Run the same calls on an eager and a compiled engine; assert equal results each call."""
    eager = Engine(net, num_classes=_classes(net))
    compiled = Engine(net, num_classes=_classes(net), mode="compiled", **compiled_options)
    pairs = [
        (eager.open_stream(name, config, seed=i), compiled.open_stream(name, config, seed=i))
        for i, (name, config) in enumerate(streams)
    ]
    for counts, adapt, x in calls:
        used = [(pair, count) for pair, count in zip(pairs, counts, strict=True) if count]
        want = eager.forward(
            x, [(p[0], c) for p, c in used], [a for a, c in zip(adapt, counts, strict=True) if c]
        )
        got = compiled.forward(
            x, [(p[1], c) for p, c in used], [a for a, c in zip(adapt, counts, strict=True) if c]
        )
        torch.testing.assert_close(got.logits, want.logits, equal_nan=True, **TOLERANCE)
        assert got.refusals() == want.refusals()
        assert_same_states(eager, compiled, pairs)
    return compiled


def _classes(net: nn.Module) -> int:
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1].out_features


@COMPILES
def test_compiled_matches_eager_with_padded_rows_and_streams() -> None:
    """adabn, 3 streams of 1-2 images in one bucket layout of 8 rows x 4 streams: the padding
    rows and streams change no logit and no state, and the layout compiles once."""
    net = two_layer_net()
    calls = [
        ([2, 1, 2], [True] * 3, images(5, 0, shift=0.5)),
        ([1, 2, 2], [True] * 3, images(5, 1, shift=-0.3)),
        ([2, 2, 1], [True] * 3, images(5, 2, shift=1.0)),
    ]
    compiled = check_calls(
        net, [("adabn", {"prior_images": 2})] * 3, calls, row_buckets=[8], stream_buckets=[4]
    )
    assert compiled.compiled is not None
    shape = tuple(calls[0][2].shape[1:])
    assert compiled.compiled.variants == {(shape, ((("adabn", ()), True, 8, 4),))}


@COMPILES
def test_a_known_layout_on_a_new_pool_checks_every_guard_again() -> None:
    """A layout that ran skips the guards that do not tell the variants apart, until its pool
    changes: closing the last stream drops the pool, and the same layout on a new pool (a new
    object with its own tensors) runs every guard, then gives what fresh streams give."""
    engine = Engine(two_layer_net(), num_classes=3, mode="compiled", row_buckets=[8])
    x = images(5, 0, shift=0.5)
    streams = [engine.open_stream("adabn", {"prior_images": 2}) for _ in range(3)]
    segments = list(zip(streams, [2, 1, 2], strict=True))
    first = engine.forward(x, segments).logits
    engine.forward(x, segments)
    assert engine.compiled is not None and len(engine.compiled.ready) == 1
    pool = engine.pool_of(streams[0])
    for stream in streams:
        engine.close_stream(stream)
    assert not engine.compiled.ready
    streams = [engine.open_stream("adabn", {"prior_images": 2}) for _ in range(3)]
    assert engine.pool_of(streams[0]) is not pool
    segments = list(zip(streams, [2, 1, 2], strict=True))
    torch.testing.assert_close(engine.forward(x, segments).logits, first, **TOLERANCE)
    assert len(engine.compiled.ready) == 1


def test_a_batch_outside_the_buckets_runs_eagerly() -> None:
    """Too many images for the largest bucket: the eager step, same results, nothing compiled."""
    net = two_layer_net()
    compiled = check_calls(
        net, [("alpha_bn", {})], [([3], [True], images(3, 0))], row_buckets=[2], stream_buckets=[1]
    )
    assert compiled.compiled is not None and not compiled.compiled.variants


def test_buckets_pad_to_the_smallest_that_fits() -> None:
    step = CompiledStep(lambda *args: args, row_buckets=[4, 1, 16], stream_buckets=[2, 8])
    assert step.pad(SHAPE, [("p", True, 3, 2), ("q", False, 1, 1)]) == [(4, 2), (1, 1)]
    assert step.pad(SHAPE, [("p", True, 17, 1)]) is None  # beyond the largest row bucket
    assert step.pad(SHAPE, [("p", True, 16, 9)]) is None  # beyond the largest stream bucket
    with pytest.raises(ValueError, match="positive"):
        CompiledStep(lambda *args: args, row_buckets=[0])


def test_a_padded_plan_and_its_captured_copy() -> None:
    """Two pools interleaved, padded to 4 rows x 2 streams: the plan's index tensors (views of
    one tensor), and a captured graph's static copy refreshed by copying that one tensor."""
    net = two_layer_net()
    engine = Engine(net, num_classes=3, mode="compiled", row_buckets=[4], stream_buckets=[2])
    a, b, c = (engine.open_stream(n) for n in ("adabn", "alpha_bn", "adabn"))
    plan = engine._plan([(a, 2), (b, 1), (c, 1)], [True] * 3, SHAPE)
    first, second = plan.groups
    values = {
        "slots": [a.slot, c.slot],
        "segment": [0, 0, 1, 0],
        "valid": [1, 1, 1, 0],  # one padding row
        "source": [0, 1],
    }
    assert {k: getattr(first, k).tolist() for k in values} == values
    assert second.slots.tolist() == [b.slot, b.slot]  # a padding stream copies the real one
    assert second.valid is not None and second.valid.tolist() == [1, 0, 0, 0]
    assert plan.gather is not None and plan.gather.tolist() == [0, 1, 3, 0, 2, 2, 2, 2]
    assert plan.back is not None and plan.back.tolist() == [0, 1, 4, 2]
    assert plan.streams is not None and plan.streams.tolist() == [0, 1, 2]
    lone = engine._plan([(a, 1), (b, 1)], [True] * 2, SHAPE).streams  # each stream padded to 2
    assert lone is not None and lone.tolist() == [0, 2]
    assert plan.bucket == ((a.pool, True, 4, 2), (b.pool, True, 4, 2))
    for view in (first.slots, first.segment, second.source, plan.gather, plan.back):
        assert view is not None and view.untyped_storage() is plan.packed.untyped_storage()

    static = _static_copy(plan)
    other = engine._plan([(c, 2), (b, 1), (a, 1)], [True] * 3, SHAPE)
    static.packed.copy_(other.packed)
    for mine, theirs in zip(static.groups, other.groups, strict=True):
        for key in values:
            assert torch.equal(getattr(mine, key), getattr(theirs, key))
    for key in ("gather", "back", "streams"):
        assert torch.equal(getattr(static, key), getattr(other, key))
    assert static.packed.data_ptr() != plan.packed.data_ptr()


def test_an_eager_plan_in_caller_order_has_no_gather() -> None:
    """One pool, streams in order: gather and back are the identity and left out."""
    engine = Engine(two_layer_net(), num_classes=3)
    a, b = engine.open_stream("adabn"), engine.open_stream("adabn")
    plan = engine._plan([(a, 2), (b, 1)], [True, True], SHAPE)
    assert plan.gather is None and plan.back is None and plan.bucket is None
    assert plan.groups[0].segment.tolist() == [0, 0, 1]
    assert plan.packed.tolist() == [a.slot, b.slot, 0, 0, 1]


def test_variants_are_bounded() -> None:
    step = CompiledStep(lambda *args: args, row_buckets=[1, 2, 4], max_variants=2)
    assert step.pad(SHAPE, [("p", True, 1, 1)]) is not None
    assert step.pad(SHAPE, [("p", True, 2, 1)]) is not None
    assert step.pad(SHAPE, [("p", True, 1, 1)]) is not None  # known: still compiled
    assert step.pad(SHAPE, [("p", True, 4, 1)]) is None  # a third layout: eager


@pytest.mark.slow
@COMPILES
@pytest.mark.parametrize("name", NAMES)
def test_every_adapter_matches_eager(name: str) -> None:
    """Each adapter, one stream then two, 1 to 4 images: one layout of 4 rows x 2 streams."""
    net = tiny_net()
    calls = [
        ([1, 0], [True, True], images(1, 0, shift=0.5)),
        ([3, 0], [True, True], images(3, 1, shift=0.5)),
        ([1, 3], [True, True], images(4, 2, shift=-0.5)),
        ([2, 2], [True, True], images(4, 3, shift=0.2)),
    ]
    check_calls(net, [(name, {}), (name, {})], calls, row_buckets=[4], stream_buckets=[2])


@pytest.mark.slow
@COMPILES
def test_a_mixed_batch_of_every_adapter_matches_eager() -> None:
    """Every adapter in one forward (two of them not adapting), one stream refused for a NaN
    image, the others committed, alternating with a layout of one stream (a known layout skips
    the guards that do not tell the variants apart: each call must still pick its own); then a
    pool grows without a recompile."""
    net = tiny_net()
    streams = [(name, {}) for name in NAMES for _ in range(2)]  # 2 per pool; pools start at 4
    counts = [1, 2] * len(NAMES)
    x = images(sum(counts), 0, shift=0.5)
    broken = x.clone()
    broken[4, 0, 0, 0] = float("nan")  # the second stream of NAMES[1]
    # The last two adapters' streams are normalised without being adapted.
    adapt = [name not in NAMES[-2:] for name, _ in streams]
    solo = [1] + [0] * (len(streams) - 1)  # the first stream alone: another layout
    calls = [
        (counts, adapt, x),
        (solo, adapt, images(1, 1)),
        (counts, adapt, broken),
        (solo, adapt, images(1, 2)),
        (counts, adapt, x),
    ]
    compiled = check_calls(net, streams, calls, row_buckets=[4], stream_buckets=[2])
    more = [compiled.open_stream("adabn") for _ in range(2)]  # 4 adabn streams: pool full
    x = images(2, 3)
    compiled.forward(x, [(more[0], 1), (more[1], 1)])  # compiles the (adabn, 4, 2) layout
    capacity = compiled.pool_of(more[0]).capacity
    more += [compiled.open_stream("adabn") for _ in range(3)]
    assert compiled.pool_of(more[0]).capacity > capacity
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.forward(x, [(more[0], 1), (more[4], 1)])


# --- precision: what stays fp64 and why -------------------------------------------------------


def _merge_stream(dtype: torch.dtype, offset: float, images: int, batch: int) -> tuple:
    """Chan-merge a stream of ``images`` single-channel images (64 pixels each, means near
    ``offset``) batch by batch with ``dtype`` accumulators, as AdaBN and the drift observer do;
    return the (mean, var) reached and the exact ones (float128 two-pass over the same inputs)."""
    import numpy as np

    from adapters.base import chan_merge
    from engine.core import _moments

    generator = torch.Generator().manual_seed(0)
    n = torch.zeros(1, dtype=dtype)
    mean = torch.zeros((1, 1), dtype=dtype)
    m2 = torch.zeros((1, 1), dtype=dtype)
    all_means, all_vars = [], []
    segment = torch.zeros(batch, dtype=torch.int64)
    count = torch.tensor([float(batch)], dtype=torch.float64)
    members = torch.ones((1, batch), dtype=torch.float64)
    for _ in range(images // batch):
        # Per-image moments as the network gives them: float32.
        sample_mean = (offset + torch.randn((batch, 1), generator=generator)).float()
        sample_var = (0.5 + torch.rand((batch, 1), generator=generator)).float()
        moments, _ = _moments(sample_mean, sample_var, segment, count, 64, members)
        moments = dataclasses.replace(
            moments, mean=moments.mean.to(dtype), var=moments.var.to(dtype)
        )
        n, mean, m2 = chan_merge(n, mean, m2, dataclasses.replace(moments, images=count.to(dtype)))
        all_means.append(sample_mean.double().numpy())
        all_vars.append(sample_var.double().numpy())
    means = np.concatenate(all_means).astype(np.longdouble)
    variances = np.concatenate(all_vars).astype(np.longdouble)
    exact_mean = means.mean()
    exact_var = variances.mean() + ((means - exact_mean) ** 2).mean()
    return float(mean[0, 0]), float(m2[0, 0] / n[0]), float(exact_mean), float(exact_var)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_fp64_stream_accumulators_stay_exact_over_a_million_images(offset: float) -> None:
    """AdaBN's and the observer's (count, mean, M2) after 10^6 images, at a mean 10^4 standard
    deviations from zero: mean within 1e-9 std, variance within 1e-9 relative (measured: 3e-12
    and 6e-15). This is why the stream accumulators are fp64."""
    mean, var, exact_mean, exact_var = _merge_stream(torch.float64, offset, 10**6, 1000)
    assert abs(mean - exact_mean) <= 1e-9 * exact_var**0.5
    assert abs(var - exact_var) <= 1e-9 * exact_var


def test_fp32_stream_accumulators_would_drift() -> None:
    """The same stream with fp32 accumulators: its mean is off by more than 1e-4 std (measured
    2e-3), 10^5 times the fp64 bound: at a large offset the mean's ulp swamps a long stream's
    small updates."""
    mean, _, exact_mean, exact_var = _merge_stream(torch.float32, 1e4, 10**6, 1000)
    assert abs(mean - exact_mean) > 1e-4 * exact_var**0.5


@pytest.mark.slow
@COMPILES
def test_warm_up_compiles_a_layout_and_leaves_no_stream() -> None:
    net = two_layer_net()
    engine = Engine(net, num_classes=3, mode="compiled", row_buckets=[4], stream_buckets=[2])
    engine.warm_up("adabn", {}, [(3, 2)], (3, 8, 8))
    assert not engine.pools  # the temporary streams and their pool are gone
    streams = [engine.open_stream("adabn") for _ in range(2)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = engine.forward(images(4, 0), [(streams[0], 1), (streams[1], 3)])
    assert result.refusals() == [None, None]
    with pytest.raises(ValueError, match="cannot hold"):
        engine.warm_up("adabn", {}, [(1, 2)], (3, 8, 8))


# --- CUDA (not run in this session: no GPU was lent) ------------------------------------------


@COMPILES
@pytest.mark.parametrize("graphs", [False, True], ids=["compiled", "compiled+graphs"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_on_cuda_matches_eager_on_cpu(graphs: bool) -> None:
    """Every adapter in one batch, compiled on CUDA (and replayed as captured CUDA graphs, the
    commit inside the replay), against the eager engine on the CPU, three calls in a row."""
    net = tiny_net()
    cpu = Engine(net, num_classes=5)
    cuda = Engine(
        net,
        num_classes=5,
        device="cuda",
        mode="compiled",
        cuda_graphs=graphs,
        row_buckets=[4],
        stream_buckets=[1],
    )
    on_cpu = [cpu.open_stream(name, seed=i) for i, name in enumerate(NAMES)]
    on_cuda = [cuda.open_stream(name, seed=i) for i, name in enumerate(NAMES)]
    for round_ in range(3):
        x = images(3 * len(NAMES), round_, shift=0.5)
        expected = cpu.forward(x, [(s, 3) for s in on_cpu]).logits
        got = cuda.forward(x.cuda(), [(s, 3) for s in on_cuda]).logits
        torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)
    assert_same_states(cpu, cuda, list(zip(on_cpu, on_cuda, strict=True)))


def test_engine_mode_auto_compiles_only_where_the_benchmark_measured_it_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine import compiled
    from service.runtime import CompileOptions

    monkeypatch.setitem(compiled.FASTER_ON, "cpu", True)
    monkeypatch.setitem(compiled.FASTER_ON, "cuda", False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CompileOptions("auto").compiled(cpu) and not CompileOptions("auto").compiled(cuda)
    assert CompileOptions("compiled").compiled(cuda)
    assert not CompileOptions("eager").compiled(cpu)
