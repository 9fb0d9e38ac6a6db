"""The engine on CUDA: the same numbers as on the CPU, and no host synchronisation per forward."""

from __future__ import annotations

import pytest
import torch

from adapters import ADAPTERS
from engine.core import Engine
from tests.adapters.conftest import images, tiny_net

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.backends("torch"),  # the ONNX backend on CUDA: tests/engine/test_onnx.py
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_matches_cpu_for_a_mixed_batch() -> None:
    net = tiny_net()
    cpu, gpu = Engine(net, num_classes=5), Engine(net, num_classes=5, device="cuda")
    names = sorted(ADAPTERS)
    on_cpu = [cpu.open_stream(name, seed=i) for i, name in enumerate(names)]
    on_gpu = [gpu.open_stream(name, seed=i) for i, name in enumerate(names)]
    for round_ in range(3):
        x = images(3 * len(names), round_, shift=0.5)
        expected = cpu.forward(x, [(s, 3) for s in on_cpu]).logits
        got = gpu.forward(x, [(s, 3) for s in on_gpu]).logits
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert cpu.drift(a)["images"] == gpu.drift(b)["images"]


def test_forward_makes_no_host_sync() -> None:
    """The hot path only enqueues work: a synchronising call in it raises in this mode."""
    net = tiny_net()
    engine = Engine(net, num_classes=5, device="cuda")
    streams = [engine.open_stream(name) for name in sorted(ADAPTERS)]
    x = images(2 * len(streams), 0).cuda()
    engine.forward(x, [(s, 2) for s in streams])  # warm-up: lazy CUDA init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.forward(x, [(s, 2) for s in streams])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autocast_keeps_statistics_in_float32() -> None:
    net = tiny_net()
    fp32 = Engine(net, num_classes=5, device="cuda")
    amp = Engine(net, num_classes=5, device="cuda", autocast_dtype=torch.bfloat16)
    a, b = fp32.open_stream("adabn"), amp.open_stream("adabn")
    x = images(16, 0, shift=2.0)
    torch.testing.assert_close(
        amp.forward(x, [(b, 16)]).logits, fp32.forward(x, [(a, 16)]).logits, rtol=0.05, atol=0.05
    )
    state = amp.pool_of(b).layers[0]
    assert state["mean"].dtype == torch.float64 and bool(torch.isfinite(state["m2"]).all())


def test_cuda_graph_replays_match_eager_forwards() -> None:
    """Captured layouts, replayed with other streams and images, give the eager numbers."""
    net = tiny_net()
    eager = Engine(net, num_classes=5, device="cuda", cuda_graphs=False)
    graphed = Engine(net, num_classes=5, device="cuda", cuda_graphs=True, max_graphs=2)
    names = sorted(ADAPTERS)
    a = [eager.open_stream(name, seed=i) for i, name in enumerate(names * 2)]
    b = [graphed.open_stream(name, seed=i) for i, name in enumerate(names * 2)]
    layouts = [[0, 1, 2], [3, 4, 5, 6], [0, 1, 2], [7, 8, 9], [10, 11, 0], [3, 4, 5, 6]]
    for round_, members in enumerate(layouts * 2):
        sizes = [1 + (round_ + i) % 3 for i in range(len(members))]
        x = images(sum(sizes), round_, shift=0.4)
        expected = eager.forward(x, [(a[m], n) for m, n in zip(members, sizes, strict=True)]).logits
        got = graphed.forward(x, [(b[m], n) for m, n in zip(members, sizes, strict=True)]).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for s, t in zip(a, b, strict=True):
        torch.testing.assert_close(
            graphed.pool_of(t).layers[-1]["obs.mean"][t.slot],
            eager.pool_of(s).layers[-1]["obs.mean"][s.slot],
        )
    assert len(graphed._graphs) <= 2


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_poisoned_stream_is_refused_alone_on_cuda(cuda_graphs: bool) -> None:
    """The validity mask is a static output of the captured graph: replays refuse per stream."""
    net = tiny_net()
    engine = Engine(net, num_classes=5, device="cuda", cuda_graphs=cuda_graphs)
    eager = Engine(net, num_classes=5, device="cuda")
    names = sorted(ADAPTERS)
    streams = [engine.open_stream(name, seed=i) for i, name in enumerate(names)]
    mirror = [eager.open_stream(name, seed=i) for i, name in enumerate(names)]
    for round_, bad in enumerate([0, 3, 1, 5, 2, 4]):  # the same layout, another victim each time
        x = images(2 * len(names), round_, shift=0.3)
        x[2 * bad : 2 * bad + 2] = 3e38
        before = engine.export_stream(streams[bad])
        result = engine.forward(x, [(s, 2) for s in streams])
        refusals = result.refusals()
        assert [i for i, r in enumerate(refusals) if r is not None] == [bad]
        assert engine.export_stream(streams[bad]) == before
        good = [i for i in range(len(names)) if i != bad]
        rows = torch.tensor([2 * i + j for i in good for j in range(2)])
        expected = eager.forward(x[rows], [(mirror[i], 2) for i in good]).logits
        torch.testing.assert_close(result.logits[rows.cuda()], expected, rtol=1e-4, atol=1e-4)
        for i in good:
            got, want = engine.pool_of(streams[i]), eager.pool_of(mirror[i])
            for key, value in got.read(streams[i].slot).items():
                torch.testing.assert_close(value, want.read(mirror[i].slot)[key])
