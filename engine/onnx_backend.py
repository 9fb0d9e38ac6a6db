"""The ONNX Runtime backend: an ONNX classifier cut at every BatchNormalization node.

Every ONNX serving path freezes BatchNorm (its statistics are constants, often folded into the
convolutions). Here the graph is cut, with the ``onnx`` API, at each BatchNormalization node
whose input is an image tensor: every segment between two cuts is its own ONNX Runtime session,
and at each cut the engine's own arithmetic (``engine.network.normalize``, the statistics of
the batch's adapters) normalises the BN input. Every tensor still needed after a cut (a residual
branch) is carried across it. The same code as the PyTorch backend runs between the segments,
so every adapter, its defaults and a stream's exported state are the same for both backends.

On CUDA, the tensors stay on the device: each segment runs with I/O binding on torch's current
stream (inputs bound by pointer, outputs handed to torch through DLPack).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper, shape_inference
from torch import Tensor

from adapters.base import SourceStats
from engine.network import NormLayer, Statistics, normalize
from engine.onnx_fused import FusedForward
from models.errors import IncompatibleModelError, ModelError

logger = logging.getLogger(__name__)

Design = Literal["fused", "segments"]

# BatchNormalization has its current inputs and outputs since opset 9 (no ``spatial``); ONNX
# Runtime 1.31 runs up to opset 23. Beyond, a file may hold ops this runtime does not know.
MIN_OPSET, MAX_OPSET = 9, 23
FOLDED_HINT = (
    "BatchNorm may have been folded into the convolutions by the exporter: export with "
    "torch.onnx.export(..., training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False) "
    "or `tta-serve export-onnx` (README, 'ONNX models')"
)


@dataclass(frozen=True)
class _Segment:
    """The nodes between two cuts, as one session: the tensors it reads and writes."""

    session: ort.InferenceSession | None  # None: no node (two BN layers in a row)
    inputs: list[str]
    outputs: list[str]
    done: list[str]  # tensors no later segment or cut reads: dropped after this segment


@dataclass(frozen=True)
class _Cut:
    """One adapted BatchNormalization node: it reads ``input`` and writes ``output``."""

    input: str
    output: str


def read_onnx(path: Path, name: str = "model") -> onnx.ModelProto:
    """Parse and check an ONNX file; ModelError or IncompatibleModelError with the reason."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelError(f"cannot read ONNX file {path}: {error.strerror or error}") from None
    try:
        model = onnx.load_model_from_string(data)
        check_opset(model, name)  # first: the checker fails on ops of an unknown opset
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as error:
        raise IncompatibleModelError(
            f"{path.name} is not a valid ONNX model (malformed or truncated file): {error}"
        ) from None
    return model


class OnnxNetwork:
    """An ONNX classifier served through ONNX Runtime, its BN statistics given by the batch.

    Args:
        model: a checked ONNX model (see :func:`read_onnx`) with BatchNormalization nodes.
        device: cpu (CPUExecutionProvider) or cuda (CUDAExecutionProvider, on torch's stream).
        name: what errors call the model.
        channels: the input channels required (3 for images; None: any fixed number).
        design: "fused" (default): a batch of one group of streams runs as one graph with the
            adapter's arithmetic inside (``engine.onnx_fused``), other batches run the cut
            graph; "segments": every batch runs the cut graph.

    Raises:
        IncompatibleModelError: an unsupported opset, an input that is not one NCHW float32
            tensor of ``channels`` channels, an output that is not ``[N, classes]``, or no
            BatchNormalization node with constant parameters to adapt.
    """

    capturable = False

    def __init__(
        self,
        model: onnx.ModelProto,
        device: torch.device,
        name: str = "model",
        channels: int | None = 3,
        design: Design = "fused",
    ) -> None:
        self.name = name
        self.device = device
        check_opset(model, name)
        graph = model.graph
        constants = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in constants]
        self.input_name, self.channels, self.input_size = _image_input(inputs, name, channels)
        self.output_name, self.num_classes = _class_output(list(graph.output), name)
        inferred = shape_inference.infer_shapes(model)
        types = _value_types(inferred.graph)
        values = _constant_values(graph)
        nodes = list(graph.node)
        cuts = [i for i, node in enumerate(nodes) if _adapted(node, types)]
        if not cuts:
            raise IncompatibleModelError(
                f"model {name} has no BatchNormalization node on an image tensor: nothing to "
                f"adapt ({FOLDED_HINT})"
            )
        layers = [self._layer(nodes[i], values, index) for index, i in enumerate(cuts)]
        # The state's layer order is the PyTorch backend's where the names tell it, so that a
        # stream's state moves between the backends; ``order[k]`` is cut k's layer.
        self.order = module_order([layer.name for layer in layers])
        self.layers = [layers[self.order.index(k)] for k in range(len(layers))]
        self.cuts = [_Cut(nodes[i].input[0], nodes[i].output[0]) for i in cuts]
        self.providers = _providers(device)
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3  # its warnings would repeat once per segment
        # ORT's and torch's kernels alternate on the same cores: ORT's threads must not spin
        # between its runs, or they keep the cores from torch's kernels.
        self.options.intra_op_num_threads = torch.get_num_threads()
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.segments = self._segments(model, nodes, cuts, types)
        # The untouched file, BN constants and ORT's fusions included: the source forward.
        self.plain = self._session(model)
        self.fused: FusedForward | None = None
        if design == "fused" and FusedForward.supports(model):
            self.fused = FusedForward(
                model, cuts, self.layers, self.order, self._session, self._run
            )

    def _layer(self, node: onnx.NodeProto, values: dict[str, np.ndarray], index: int) -> NormLayer:
        """The NormLayer of one BatchNormalization node (its parameters must be constants)."""
        arrays = []
        for role, tensor in zip(("scale", "B", "mean", "var"), node.input[1:5], strict=True):
            if tensor not in values:
                raise IncompatibleModelError(
                    f"model {self.name}: the {role} of BatchNormalization {node.name!r} is "
                    "computed in the graph, not a constant: no source statistics to adapt from"
                )
            arrays.append(torch.from_numpy(values[tensor].astype(np.float32)).to(self.device))
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("training_mode", 0):
            raise IncompatibleModelError(
                f"model {self.name}: BatchNormalization {node.name!r} is in training mode; "
                "export the model in eval mode"
            )
        # ONNX's momentum weighs the running value (0.9 is PyTorch's momentum 0.1).
        momentum = 1.0 - float(attributes.get("momentum", 0.9))
        source = SourceStats(arrays[2], arrays[3], float(attributes.get("epsilon", 1e-5)), momentum)
        # PyTorch's exports name the scale "<module>.weight": the name the PyTorch backend uses.
        scale = node.input[1]
        name = scale.removesuffix(".weight") if scale.endswith(".weight") else node.name
        return NormLayer(name or f"bn{index}", source, arrays[0], arrays[1])

    def _segments(
        self,
        model: onnx.ModelProto,
        nodes: list[onnx.NodeProto],
        cuts: list[int],
        types: dict[str, onnx.TypeProto],
    ) -> list[_Segment]:
        """One session per run of nodes between two cuts (and after the last one)."""
        graph = model.graph
        initializers = {init.name: init for init in graph.initializer}
        bounds = list(zip([-1, *cuts], [*cuts, len(nodes)], strict=True))
        # The last stage that reads each tensor: segment k is stage 2k, the cut after it 2k + 1.
        last_read: dict[str, int] = {}
        for k, (start, stop) in enumerate(bounds):
            for node in nodes[start + 1 : stop]:
                last_read.update((tensor, 2 * k) for tensor in _reads(node))
            if k < len(cuts):
                last_read[self.cuts[k].input] = 2 * k + 1
        last_read[self.output_name] = 2 * len(bounds)  # read by the caller, after every stage
        segments = []
        for k, (start, stop) in enumerate(bounds):
            members = nodes[start + 1 : stop]
            written = list(dict.fromkeys(out for node in members for out in node.output if out))
            read = [t for node in members for t in _reads(node)]
            inputs = list(
                dict.fromkeys(t for t in read if t not in initializers and t not in written)
            )
            outputs = [t for t in written if last_read.get(t, -1) > 2 * k]
            done = [t for t, stage in last_read.items() if stage in (2 * k, 2 * k + 1)]
            constants = [initializers[t] for t in dict.fromkeys(read) if t in initializers]
            session = None
            if members:
                sub = helper.make_graph(
                    members,
                    f"segment{k}",
                    [_value_info(t, types) for t in inputs],
                    [_value_info(t, types) for t in outputs],
                    constants,
                )
                piece = helper.make_model(
                    sub, opset_imports=model.opset_import, ir_version=model.ir_version
                )
                session = self._session(piece)
            segments.append(_Segment(session, inputs, outputs, done))
        return segments

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), self.options, providers=self.providers
            )
        except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as error:
            raise IncompatibleModelError(
                f"model {self.name}: ONNX Runtime cannot run it: {error}"
            ) from None
        if session.get_providers()[0] != self.providers[0][0]:
            raise ModelError(f"model {self.name}: {self.providers[0][0]} failed to start")
        return session

    def forward(self, x: Tensor, batch: Statistics | None) -> Tensor:
        """Logits of ``x``: the fused graph or the segments, with ``batch``'s statistics.

        A batch of one group runs the fused graph (design "fused"); other batches, and those
        with source rows, run the segments, each cut normalising with ``batch``'s statistics.
        Without a batch, the untouched file (BN as constants, fused by ONNX Runtime).
        """
        if batch is None:
            return self._run(self.plain, {self.input_name: x}, [self.output_name])[0]
        if self.fused is not None and len(batch.groups) == 1 and not batch.source_rows:
            logits = self.fused.forward(x, batch, batch.groups[0])
            if logits is not None:
                return logits
        env = {self.input_name: x}
        for k, segment in enumerate(self.segments):
            if segment.session is not None:
                feeds = {name: env[name] for name in segment.inputs}
                results = self._run(segment.session, feeds, segment.outputs)
                env.update(zip(segment.outputs, results, strict=True))
            if k < len(self.cuts):
                cut = self.cuts[k]
                y = env[cut.input]
                layer = self.order[k]
                mean, var = batch.statistics(layer, y)
                env[cut.output] = normalize(y, mean, var, self.layers[layer])
            for name in segment.done:
                env.pop(name, None)
        return env[self.output_name]

    def _run(
        self, session: ort.InferenceSession, feeds: dict[str, Tensor], outputs: Sequence[str]
    ) -> list[Tensor]:
        """Run one session on torch tensors, without a copy through the host on CUDA."""
        if self.device.type != "cuda":
            arrays = {name: t.contiguous().numpy() for name, t in feeds.items()}
            return [torch.from_numpy(a) for a in session.run(list(outputs), arrays)]
        binding = session.io_binding()
        index = self.device.index or 0
        # Bound by pointer: the contiguous copies must live until the run is over.
        inputs = {name: tensor.contiguous() for name, tensor in feeds.items()}
        for name, tensor in inputs.items():
            binding.bind_input(
                name,
                "cuda",
                index,
                _NUMPY_TYPES[tensor.dtype],
                list(tensor.shape),
                tensor.data_ptr(),
            )
        for name in outputs:
            binding.bind_output(name, "cuda", index)
        session.run_with_iobinding(binding)
        return [torch.from_dlpack(value) for value in binding.get_outputs()]


_NUMPY_TYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}


def load_onnx(
    path: Path, device: torch.device, name: str = "model", design: Design = "fused"
) -> OnnxNetwork:
    """Read, check and cut an ONNX classifier (see :class:`OnnxNetwork` for what is refused)."""
    return OnnxNetwork(read_onnx(path, name), device, name, design=design)


def module_order(names: list[str]) -> list[int]:
    """Where each BN layer (named by its module path, in forward order) is in PyTorch's order.

    The PyTorch backend numbers BatchNorm2d layers as ``convert_batchnorm`` meets them: modules
    in depth-first order, each one's own BN children first. Siblings are taken in the order the
    forward first reaches them (registration order, which the file does not keep). Names that
    are not module paths (another exporter's node names) keep the forward order.
    """
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        parts = name.split(".")
        for depth in range(len(parts) + 1):
            first.setdefault(".".join(parts[:depth]), index)
    children: dict[str, list[str]] = {}
    for path in sorted(first, key=first.__getitem__):
        if path:
            children.setdefault(path.rpartition(".")[0], []).append(path)
    layers = set(names)
    visit: list[int] = []

    def walk(path: str) -> None:
        kids = children.get(path, [])
        visit.extend(names.index(kid) for kid in kids if kid in layers and kid not in children)
        for kid in kids:
            if kid in children:
                walk(kid)

    walk("")
    if len(visit) != len(names) or len(layers) != len(names):
        return list(range(len(names)))
    return [visit.index(k) for k in range(len(names))]


def check_opset(model: onnx.ModelProto, name: str) -> None:
    """Raise IncompatibleModelError unless the model's default-domain opset is supported."""
    versions = [e.version for e in model.opset_import if e.domain in ("", "ai.onnx")]
    if not versions or not MIN_OPSET <= versions[0] <= MAX_OPSET:
        found = f"opset {versions[0]}" if versions else "no default opset"
        raise IncompatibleModelError(
            f"model {name} uses {found}; supported: {MIN_OPSET} to {MAX_OPSET}"
        )


def _image_input(
    inputs: list[onnx.ValueInfoProto], name: str, channels: int | None = None
) -> tuple[str, int, tuple[int, int]]:
    """The one NCHW float32 input: its name, channels and (H, W) (0 where dynamic).

    ``channels``: the number the input must have (3 for images; None: any fixed number).
    """
    if len(inputs) != 1:
        raise IncompatibleModelError(
            f"model {name} has {len(inputs)} inputs; expected one image tensor [N, 3, H, W]"
        )
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    wanted = channels or (dims[1] if len(dims) == 4 and dims[1] else -1)
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or dims[1] != wanted:
        shape = [d.dim_value or d.dim_param or "?" for d in tensor.shape.dim]
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        layout = " (channels last? only NCHW is served)" if len(dims) == 4 and dims[3] == 3 else ""
        raise IncompatibleModelError(
            f"model {name}: input {inputs[0].name!r} is {kind} {shape}; expected a float32 "
            f"image tensor [N, 3, H, W]{layout}"
        )
    return inputs[0].name, dims[1], (dims[2], dims[3])


def _class_output(outputs: list[onnx.ValueInfoProto], name: str) -> tuple[str, int]:
    """The one [N, classes] output: its name and number of classes (0 where dynamic)."""
    dims = [d.dim_value for d in outputs[0].type.tensor_type.shape.dim] if outputs else []
    if len(outputs) != 1 or len(dims) != 2:
        raise IncompatibleModelError(f"model {name}: expected one output of logits [N, classes]")
    return outputs[0].name, dims[1]


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's inferred type, by name."""
    infos = [*graph.input, *graph.value_info, *graph.output]
    return {info.name: info.type for info in infos}


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Tensors whose values are known without running the graph (initializers, Constant)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _adapted(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> bool:
    """A BatchNormalization of a 4-d tensor: adapted (others, e.g. on [N, C], stay constant)."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    known = types.get(node.input[0])
    if known is None or not known.tensor_type.HasField("shape"):
        return True  # no inferred shape: an image tensor is the likely case, checked at run
    return len(known.tensor_type.shape.dim) == 4


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads (optional inputs left out)."""
    return [name for name in node.input if name]


def _value_info(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A segment's input or output, typed as shape inference found it (rank, no sizes)."""
    known = types.get(name)
    elem = known.tensor_type.elem_type if known is not None else onnx.TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem or onnx.TensorProto.FLOAT, None)


def _providers(device: torch.device) -> list[tuple[str, dict]]:
    """ONNX Runtime's provider for the engine's device (CUDA on torch's current stream)."""
    if device.type == "cpu":
        return [("CPUExecutionProvider", {})]
    if device.type != "cuda" or "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ModelError(f"ONNX Runtime has no execution provider for device {device}")
    # One stream for torch and ONNX Runtime: the kernels of both run in order, with no sync.
    stream = torch.cuda.current_stream(device).cuda_stream
    options = {"device_id": str(device.index or 0), "user_compute_stream": str(stream)}
    return [("CUDAExecutionProvider", options)]
