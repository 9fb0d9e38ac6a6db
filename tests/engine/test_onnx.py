"""The ONNX Runtime backend: parity with the PyTorch engine on CIFAR ResNet-20, refused files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import models.export_onnx as export_onnx_module
from adapters import ADAPTERS
from engine import Engine, StreamHandle, onnx_fused
from engine.onnx_backend import Design, OnnxNetwork, load_onnx, module_order
from models import IncompatibleModelError, ModelError, create_model, get_spec, normalize
from models.export_onnx import export_onnx, to_onnx
from tests.adapters.conftest import images, tiny_net

MODEL = "cifar10_resnet20"
CPU = torch.device("cpu")
NAMES = sorted(ADAPTERS)
DESIGNS: tuple[Design, ...] = ("fused", "segments")


@pytest.fixture(scope="module")
def resnet20(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The pretrained model and its export by ``tta-serve export-onnx``."""
    path = tmp_path_factory.mktemp("onnx") / f"{MODEL}.onnx"
    assert export_onnx(MODEL, path, cache_dir=model_cache) == 20 - 1  # 19 BN layers
    model, _ = create_model(MODEL, cache_dir=model_cache)
    return model, path


@pytest.fixture(scope="module")
def cifar(shared_dir: Path) -> Tensor:
    """100 CIFAR-10 test images of the shared archive (10 per class, interleaved), normalised."""
    archive = shared_dir / "data" / "cifar10" / "cifar10-test-jpeg.tar.gz"
    by_class: dict[str, list[np.ndarray]] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            label = Path(member.name).parent.name
            if not member.isfile() or len(by_class.setdefault(label, [])) == 10:
                continue
            data = tar.extractfile(member)
            assert data is not None
            by_class[label].append(np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB")))
    assert len(by_class) == 10
    pixels = [image for group in zip(*by_class.values(), strict=True) for image in group]
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return normalize(batch, get_spec(MODEL))


@pytest.fixture(scope="module")
def networks(resnet20: tuple[nn.Module, Path]) -> dict[str, OnnxNetwork]:
    """The exported file loaded with each design, shared by the tests of this module.

    A network keeps no stream state (only its sessions, built on first use), so engines that
    share it are as independent as engines on separate loads.
    """
    return {design: load_onnx(resnet20[1], CPU, design=design) for design in DESIGNS}


def engines(
    resnet20: tuple[nn.Module, Path], network: OnnxNetwork | None = None
) -> tuple[Engine, Engine]:
    model, path = resnet20
    return (
        Engine(model, name=MODEL, num_classes=10),
        Engine(network or load_onnx(path, CPU), name=MODEL, num_classes=10),
    )


def assert_same_logits(expected: Tensor, got: Tensor) -> None:
    assert (expected - got).abs().max().item() <= 1e-4
    assert torch.equal(expected.argmax(1), got.argmax(1))


def assert_same_state(first: Engine, a: StreamHandle, second: Engine, b: StreamHandle) -> None:
    expected, got = first.pool_of(a).read(a.slot), second.pool_of(b).read(b.slot)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("adapter", NAMES)
def test_a_stream_matches_the_pytorch_engine(
    resnet20: tuple[nn.Module, Path],
    networks: dict[str, OnnxNetwork],
    cifar: Tensor,
    adapter: str,
    design: Design,
) -> None:
    """Five batches of 16, then five of one image: logits, top-1 and state as in PyTorch.

    Then a batch with ``adapt`` off: the same logits, and the states stay as they were.
    """
    network = networks[design]
    reference, served = engines(resnet20, network)
    a, b = reference.open_stream(adapter, seed=7), served.open_stream(adapter, seed=7)
    batches = [cifar[16 * i : 16 * (i + 1)] for i in range(5)]
    batches += [cifar[80 + i : 81 + i] for i in range(5)]
    for x in batches:
        n = x.shape[0]
        assert_same_logits(
            reference.forward(x, [(a, n)]).logits, served.forward(x, [(b, n)]).logits
        )
    assert_same_state(reference, a, served, b)
    x = cifar[85:93]
    expected = reference.forward(x, [(a, 8)], adapt=False).logits
    assert_same_logits(expected, served.forward(x, [(b, 8)], adapt=False).logits)
    assert_same_state(reference, a, served, b)
    # A batch of one stream ran as one graph in the fused design, as segments otherwise.
    fused = network.fused is not None and network.fused.graphs.get((b.pool, False)) is not None
    assert fused == (design == "fused")


def test_a_batch_mixing_adapters_matches_the_pytorch_engine(
    resnet20: tuple[nn.Module, Path], networks: dict[str, OnnxNetwork], cifar: Tensor
) -> None:
    """Several groups of streams in a batch: they run the cut graph, in the fused design too."""
    reference, served = engines(resnet20, networks["fused"])
    pairs = [
        (reference.open_stream(name, seed=i), served.open_stream(name, seed=i))
        for i, name in enumerate(NAMES)
    ]
    for round_ in range(3):
        sizes = [1 + (i + round_) % 4 for i in range(len(pairs))]
        x = cifar[round_ * 20 : round_ * 20 + sum(sizes)]
        expected = reference.forward(x, [(a, n) for (a, _), n in zip(pairs, sizes, strict=True)])
        got = served.forward(x, [(b, n) for (_, b), n in zip(pairs, sizes, strict=True)])
        assert_same_logits(expected.logits, got.logits)
    for a, b in pairs:
        assert_same_state(reference, a, served, b)


@pytest.mark.parametrize("adapter", NAMES)
def test_a_state_moves_between_the_backends(
    resnet20: tuple[nn.Module, Path],
    networks: dict[str, OnnxNetwork],
    cifar: Tensor,
    adapter: str,
) -> None:
    """A state exported by one backend, imported into the other: the same next predictions."""
    reference, served = engines(resnet20, networks["fused"])
    for source, target in ((reference, served), (served, reference)):
        stream = source.open_stream(adapter, seed=3)
        source.forward(cifar[:32], [(stream, 32)])
        moved = target.import_stream(
            target.open_stream(adapter, seed=3), source.export_stream(stream)
        )
        x = cifar[32:48]
        assert_same_logits(
            source.forward(x, [(stream, 16)]).logits, target.forward(x, [(moved, 16)]).logits
        )


def test_the_source_forward_is_the_plain_file(
    resnet20: tuple[nn.Module, Path], networks: dict[str, OnnxNetwork], cifar: Tensor
) -> None:
    reference, served = engines(resnet20, networks["fused"])
    assert_same_logits(reference.forward_source(cifar), served.forward_source(cifar))


@pytest.mark.parametrize("design", DESIGNS)
def test_source_logits_in_the_adapted_forward_are_the_plain_files(
    resnet20: tuple[nn.Module, Path], networks: dict[str, OnnxNetwork], cifar: Tensor, design: str
) -> None:
    """Label feedback's source predictions (the ``source`` flag) on ONNX: the flagged images
    run a second time normalised with the source statistics, in either design; the adapted
    logits stay the PyTorch engine's."""
    reference, served = engines(resnet20, networks[design])
    x = cifar[:8]
    results = []
    for engine in (reference, served):
        streams = [engine.open_stream("adabn"), engine.open_stream("adabn")]
        results.append(engine.forward(x, [(streams[0], 3), (streams[1], 5)], source=[False, True]))
    for result in results:
        assert result.source_logits is not None
        assert_same_logits(reference.forward_source(x[3:]), result.source_logits)
    assert_same_logits(results[0].logits, results[1].logits)


def test_a_failed_segment_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that fails between two cuts commits no stream's state."""
    network = OnnxNetwork(to_onnx(tiny_net(), (3, 8, 8)), CPU)
    engine = Engine(network, num_classes=5)
    a, b = engine.open_stream("adabn"), engine.open_stream("momentum")
    engine.forward(images(2, 0), [(a, 2)])
    before = [engine.export_stream(s) for s in (a, b)]
    session = network.segments[-1].session
    assert session is not None

    def fail(*args: object) -> None:
        raise RuntimeError("segment failed")

    monkeypatch.setattr(network, "_run", fail)
    with pytest.raises(RuntimeError, match="segment failed"):
        engine.forward(images(5, 1, shift=1.0), [(a, 2), (b, 3)])
    assert [engine.export_stream(s) for s in (a, b)] == before


def test_a_failed_fused_run_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward whose one graph fails commits no state; the next one runs as before."""
    network = OnnxNetwork(to_onnx(tiny_net(), (3, 8, 8)), CPU)
    assert network.fused is not None
    engine = Engine(network, num_classes=5)
    stream = engine.open_stream("adabn")
    engine.forward(images(2, 0), [(stream, 2)])
    before = engine.export_stream(stream)
    run = network.fused.run

    def fail(*args: object) -> None:
        raise RuntimeError("graph failed")

    monkeypatch.setattr(network.fused, "run", fail)
    with pytest.raises(RuntimeError, match="graph failed"):
        engine.forward(images(3, 1, shift=1.0), [(stream, 3)])
    assert engine.export_stream(stream) == before
    monkeypatch.setattr(network.fused, "run", run)
    engine.forward(images(3, 1, shift=1.0), [(stream, 3)])
    assert engine.export_stream(stream) != before


def test_a_group_whose_graph_cannot_be_built_runs_the_cut_graph(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An adapter whose arithmetic does not trace is logged and served by the segments."""
    proto = to_onnx(tiny_net(), (3, 8, 8))
    fused, segments = OnnxNetwork(proto, CPU), OnnxNetwork(proto, CPU, design="segments")

    def untraceable(*args: object) -> None:
        raise RuntimeError("cannot trace")

    monkeypatch.setattr(onnx_fused, "_trace_layer", untraceable)
    engines = [Engine(network, num_classes=5) for network in (fused, segments)]
    streams = [engine.open_stream("momentum") for engine in engines]
    x = images(4, 0)
    first, second = (e.forward(x, [(s, 4)]).logits for e, s in zip(engines, streams, strict=True))
    assert torch.equal(first, second)
    assert fused.fused is not None and fused.fused.graphs[(streams[0].pool, True)] is None
    assert "no fused ONNX graph (cannot trace)" in caplog.text


def test_layers_are_numbered_as_pytorch_numbers_them() -> None:
    """Forward order 1, 3.bn1, 3.bn2, 5; PyTorch meets a module's own BN children first."""
    assert module_order(["1", "3.bn1", "3.bn2", "5"]) == [0, 2, 3, 1]
    assert module_order(["bn1", "layer1.0.bn1", "layer1.0.bn2"]) == [0, 1, 2]
    assert module_order(["/a/BatchNormalization", "/b/BatchNormalization"]) == [0, 1]


# --- refused files -------------------------------------------------------------------------------


def tiny_proto() -> onnx.ModelProto:
    return to_onnx(tiny_net(), (3, 8, 8))


def refused(tmp_path: Path, proto: onnx.ModelProto | bytes) -> str:
    path = tmp_path / "model.onnx"
    path.write_bytes(proto if isinstance(proto, bytes) else proto.SerializeToString())
    with pytest.raises(ModelError) as error:
        load_onnx(path, CPU, "user")
    return str(error.value)


def test_a_file_with_folded_batchnorm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "folded.onnx"
    torch.onnx.export(
        tiny_net(), (torch.zeros(1, 3, 8, 8),), path, dynamo=False, do_constant_folding=True
    )
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    message = refused(tmp_path, path.read_bytes())
    assert "no BatchNormalization node" in message
    assert "BatchNorm may have been folded into the convolutions" in message


@pytest.mark.parametrize("data", [b"not an onnx file", "half"])
def test_a_malformed_or_truncated_file_is_refused(tmp_path: Path, data: bytes | str) -> None:
    whole = tiny_proto().SerializeToString()
    content = whole[: len(whole) // 2] if data == "half" else data
    assert isinstance(content, bytes)
    message = refused(tmp_path, content)
    assert "is not a valid ONNX model (malformed or truncated file)" in message


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read ONNX file"):
        load_onnx(tmp_path / "absent.onnx", CPU)


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        ([0, 8, 8, 3], "(channels last? only NCHW is served)"),
        ([0, 192], "expected a float32 image tensor [N, 3, H, W]"),
        ([0, 1, 8, 8], "expected a float32 image tensor [N, 3, H, W]"),
    ],
)
def test_an_input_that_is_not_an_image_tensor_is_refused(
    tmp_path: Path, dims: list[int], expected: str
) -> None:
    proto = tiny_proto()
    shape = proto.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for size in dims:
        dim = shape.dim.add()
        if size:
            dim.dim_value = size
        else:
            dim.dim_param = "batch"
    message = refused(tmp_path, proto)
    assert "input 'input'" in message and expected in message


def test_an_unsupported_opset_is_refused(tmp_path: Path) -> None:
    proto = tiny_proto()
    proto.opset_import[0].version = 8
    assert refused(tmp_path, proto) == "model user uses opset 8; supported: 9 to 23"


def test_statistics_computed_in_the_graph_are_refused(tmp_path: Path) -> None:
    proto = tiny_proto()
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    bn.input[3] = proto.graph.input[0].name  # the "mean" is now a tensor of the forward
    message = refused(tmp_path, proto)
    assert "is computed in the graph, not a constant" in message


def test_the_export_refuses_a_model_without_batchnorm() -> None:
    with pytest.raises(IncompatibleModelError, match="no BatchNorm2d layer"):
        to_onnx(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), (3, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("design", DESIGNS)
def test_cuda_provider_matches_cpu(
    resnet20: tuple[nn.Module, Path], cifar: Tensor, design: Design
) -> None:
    """On CUDA (I/O binding, DLPack, torch's stream): the CPU backend's logits and states."""
    _, path = resnet20
    cpu = Engine(load_onnx(path, CPU), name=MODEL, num_classes=10)
    cuda = load_onnx(path, torch.device("cuda"), design=design)
    gpu = Engine(cuda, name=MODEL, num_classes=10)
    for name in NAMES:
        a, b = cpu.open_stream(name, seed=1), gpu.open_stream(name, seed=1)
        for i in range(3):
            x = cifar[16 * i : 16 * (i + 1)]
            expected = cpu.forward(x, [(a, 16)]).logits
            assert_same_logits(expected, gpu.forward(x, [(b, 16)]).logits.cpu())


def test_export_onnx_uses_the_servers_weights_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tta-serve export-onnx`` reads TTA_MODEL_CACHE_DIR (seeded offline) as the server does."""
    asked: list[Path] = []

    def export(name: str, file: Path, *, cache_dir: Path) -> int:
        asked.append(cache_dir)
        return 19

    monkeypatch.setattr(export_onnx_module, "export_onnx", export)
    monkeypatch.setenv("TTA_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    export_onnx_module.main([MODEL, str(tmp_path / "model.onnx")])
    assert asked == [tmp_path / "cache"]
