"""Design (a) of the ONNX backend: the adapter's statistics computed inside one ONNX graph.

The graph cut of ``engine.onnx_backend`` (design (b)) runs the statistics between ONNX Runtime
sessions, so ONNX Runtime never sees a whole forward: each cut costs a session run, copies
and a pass of PyTorch kernels, and was 3-4x slower than the untouched file. Here each adapted
BatchNormalization node is replaced, in one graph, by the engine's own per-layer arithmetic
for one group of streams (their per-image moments, pooled per stream, the adapter's update
and normalisation statistics, the normalisation) traced from the PyTorch code with
``torch.onnx.export``, so the formulas are the adapters' own and are never written twice.
The streams' states before the batch, their hyperparameters and the batch's stream layout
are graph inputs; the logits and every layer's per-image moments are its outputs.

A single pass cannot feed a layer's moments back into itself, which is why the adapter's
arithmetic is in the graph: what layer k normalises with depends only on the states before
the batch and on layer k's own moments. After the run, the engine stages the new states from
the moments the graph returns (:meth:`~engine.network.Statistics.from_moments`), with the
same code as for the PyTorch backend, so the states stay interchangeable between backends.

One graph per (pool, ``adapt``), built on first use; a batch of several groups (adapters
mixed, or streams with ``adapt`` off next to adapting ones) runs the cut graph instead.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence

import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from adapters.base import Adapter, SourceStats
from adapters.drift import init_observer
from engine.core import _moments, adapted_statistics
from engine.network import Group, NormLayer, Statistics, normalize
from models.errors import ModelError

logger = logging.getLogger(__name__)

PREFIX = "tta/"  # every name the rewrite adds starts with it
# The traced layer's inputs and output that are the BatchNormalization node's own tensors.
_BN_ROLES = ("x", "weight", "bias", "source_mean", "source_var", "y")
SEGMENT, IMAGES, MEMBERS = f"{PREFIX}segment", f"{PREFIX}images", f"{PREFIX}members"
# torch.onnx.export (TorchScript) writes opsets 9 to 20; the layers take the model's opset.
EXPORT_OPSETS = range(13, 21)

Session = Callable[[onnx.ModelProto], ort.InferenceSession]
Runner = Callable[[ort.InferenceSession, dict[str, Tensor], Sequence[str]], list[Tensor]]


class FusedForward:
    """The adapted forward of one group of streams as one ONNX Runtime run.

    Args:
        model: the checked ONNX classifier.
        cuts: the node index of each adapted BatchNormalization node, in graph order.
        layers: the engine's norm layers; ``order[k]`` is cut k's index among them.
        session: builds a session (the network's providers and options).
        run: runs a session on torch tensors (on CUDA: I/O binding, DLPack).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        cuts: Sequence[int],
        layers: Sequence[NormLayer],
        order: Sequence[int],
        session: Session,
        run: Runner,
    ) -> None:
        self.model = model
        self.cuts = list(cuts)
        self.layers = list(layers)
        self.order = list(order)
        self.session = session
        self.run = run
        self.output = model.graph.output[0].name
        self.input = next(i.name for i in model.graph.input if i.name not in _constants(model))
        self.graphs: dict[tuple[object, bool], ort.InferenceSession | None] = {}
        self.pixels: dict[tuple[int, ...], list[int]] = {}  # per input size, each layer's H*W

    @staticmethod
    def supports(model: onnx.ModelProto) -> bool:
        """Whether the model's opset is one the layers can be exported in."""
        versions = [e.version for e in model.opset_import if e.domain in ("", "ai.onnx")]
        return bool(versions) and versions[0] in EXPORT_OPSETS

    def forward(self, x: Tensor, batch: Statistics, group: Group) -> Tensor | None:
        """Logits of ``x``, one group of streams; stages the group's new states in ``batch``.

        None, and nothing staged, when this group's graph could not be built (logged once):
        the caller runs the cut graph instead.
        """
        key = (group.pool.key, group.adapt)
        if key not in self.graphs:
            self.graphs[key] = self._build(group)
        session = self.graphs[key]
        if session is None:
            return None
        feeds = {self.input: x, SEGMENT: group.segment, IMAGES: group.images}
        feeds[MEMBERS] = group.members
        feeds.update((_hparam(k), value) for k, value in group.hparams.items())
        for index, state in enumerate(group.layers):
            feeds.update((_state(index, k), value) for k, value in state.items())
        wanted = {i.name for i in session.get_inputs()}
        feeds = {name: value for name, value in feeds.items() if name in wanted}
        count = len(self.layers)
        moments = [_moment(i, part) for i in range(count) for part in ("mean", "var")]
        pixels = self.pixels.get(tuple(x.shape[2:]))
        names = [self.output, *moments] + ([] if pixels else [_pixels(i) for i in range(count)])
        results = self.run(session, feeds, names)
        if pixels is None:  # read once per input size: a host sync on CUDA
            pixels = self.pixels[tuple(x.shape[2:])] = [int(p) for p in results[1 + 2 * count :]]
        for index in range(count):
            mean, var = results[1 + 2 * index], results[2 + 2 * index]
            batch.from_moments(index, mean, var, pixels[index])
        return results[0]

    def _build(self, group: Group) -> ort.InferenceSession | None:
        """The group's session, or None if its arithmetic does not trace or run in ORT."""
        try:
            return self.session(self._graph(group))
        except (RuntimeError, ValueError, TypeError, ModelError) as error:
            logger.warning(
                "adapter %s: no fused ONNX graph (%s); its batches run the cut graph",
                group.adapter.name,
                error,
            )
            return None

    def _graph(self, group: Group) -> onnx.ModelProto:
        """The model with each adapted BN node replaced by the group's traced arithmetic."""
        opset = next(e.version for e in self.model.opset_import if e.domain in ("", "ai.onnx"))
        graph = self.model.graph
        inputs: dict[str, onnx.ValueInfoProto] = {}
        outputs = [graph.output[0]]
        constants = list(graph.initializer)
        replaced: dict[int, list[onnx.NodeProto]] = {}
        traced: dict[tuple, onnx.GraphProto] = {}  # layers of the same shapes share a trace
        for k, cut in enumerate(self.cuts):
            index = self.order[k]
            bn = graph.node[cut]
            source = self.layers[index].source
            shapes = tuple(tuple(v.shape[1:]) for v in group.layers[index].values())
            key = (source.mean.numel(), source.eps, source.momentum, shapes)
            if key not in traced:
                traced[key] = _trace_layer(group, index, self.layers[index], opset)
            layer = traced[key]
            # The traced layer's inputs and outputs are the BN node's tensors or the graph's
            # new inputs and outputs; everything else it computes is its own.
            names = dict(zip(_BN_ROLES, [*bn.input[:5], bn.output[0]], strict=True))
            names.update(
                (info.name, _graph_name(index, info.name))
                for info in [*layer.input, *layer.output]
                if info.name not in names
            )
            prefix = f"{PREFIX}bn{index}/"

            def rename(name: str, names=names, prefix=prefix) -> str:
                return names.get(name, prefix + name) if name else name

            replaced[cut] = [_renamed(node, rename, prefix) for node in layer.node]
            for info in layer.input:
                if info.name not in _BN_ROLES:
                    inputs.setdefault(rename(info.name), _renamed_info(info, rename))
            outputs += [_renamed_info(info, rename) for info in layer.output[1:]]
            for constant in layer.initializer:
                renamed = onnx.TensorProto()
                renamed.CopyFrom(constant)
                renamed.name = rename(constant.name)
                constants.append(renamed)
        body = [n for i, node in enumerate(graph.node) for n in replaced.get(i, [node])]
        fused = onnx.helper.make_graph(
            body, f"{graph.name}-adapted", [*graph.input, *inputs.values()], outputs, constants
        )
        return onnx.helper.make_model(
            fused, opset_imports=self.model.opset_import, ir_version=self.model.ir_version
        )


class _AdaptedNorm(nn.Module):
    """One BN layer's adapted normalisation for one group of streams, as the engine does it."""

    def __init__(self, adapter: Adapter, adapt: bool, layer: NormLayer, keys, hparams) -> None:
        super().__init__()
        self.adapter, self.adapt, self.layer = adapter, adapt, layer
        self.keys, self.hparams = list(keys), list(hparams)

    def forward(self, x, weight, bias, source_mean, source_var, segment, images, members, *rest):
        state = dict(zip(self.keys, rest[: len(self.keys)], strict=True))
        hp = dict(zip(self.hparams, rest[len(self.keys) :], strict=True))
        eps, momentum = self.layer.source.eps, self.layer.source.momentum
        source = SourceStats(source_mean, source_var, eps, momentum)
        layer = NormLayer(self.layer.name, source, weight, bias)
        sample_mean, sample_var = _instance_moments(x, source_mean)
        pixels = x.shape[2] * x.shape[3]
        moments, _ = _moments(sample_mean, sample_var, segment, images, pixels, members)
        mean, var, _ = adapted_statistics(self.adapter, state, moments, source, hp, self.adapt)
        y = normalize(x, mean, var, layer)
        return y, sample_mean, sample_var, torch._shape_as_tensor(x)[2:].prod()


def _instance_moments(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`engine.network.instance_moments` with the reductions ONNX Runtime runs fast.

    The same shifted raw moments; ``vector_norm`` becomes ReduceL2, which ran 5x slower in
    ONNX Runtime than the Mul and ReduceMean used here.
    """
    centered = x - shift[:, None, None]
    mean = centered.mean((2, 3))
    var = ((centered * centered).mean((2, 3)) - mean.square()).clamp(min=0)
    return mean + shift, var


def _trace_layer(group: Group, index: int, layer: NormLayer, opset: int) -> onnx.GraphProto:
    """The ONNX graph of one layer's arithmetic, traced on a sample of two streams."""
    keys = _adapter_keys(group, index)
    hparams = list(group.hparams)
    channels = layer.source.mean.numel()
    device = layer.source.mean.device
    # Two streams, so that the pooling is traced as the general one-hot product.
    segment = torch.tensor([0, 0, 1], device=device)
    members = (torch.arange(2, device=device)[:, None] == segment[None, :]).double()
    first = torch.zeros(2, dtype=torch.int64, device=device)
    states = [group.layers[index][k].index_select(0, first) for k in keys]
    hps = [group.hparams[k].index_select(0, first) for k in hparams]
    source = layer.source
    args = (
        torch.randn(3, channels, 4, 4, device=device),
        layer.weight,
        layer.bias,
        source.mean,
        source.var,
        segment,
        members.sum(1),
        members,
        *states,
        *hps,
    )
    names = ["x", "weight", "bias", "source_mean", "source_var", "segment", "images", "members"]
    names += [f"state.{k}" for k in keys] + [f"hparam.{k}" for k in hparams]
    streams = {name: {0: "streams"} for name in names[8:]}
    dynamic = {
        "x": {0: "n", 2: "h", 3: "w"},
        "y": {0: "n", 2: "h", 3: "w"},
        "segment": {0: "n"},
        "images": {0: "streams"},
        "members": {0: "streams", 1: "n"},
        "moment.mean": {0: "n"},
        "moment.var": {0: "n"},
        **streams,
    }
    module = _AdaptedNorm(group.adapter, group.adapt, layer, keys, hparams)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python ints
        torch.onnx.export(
            module,
            args,
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to a buffer
            dynamo=False,
            input_names=names,
            output_names=["y", "moment.mean", "moment.var", "pixels"],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=False,
        )
    return onnx.load_model_from_string(buffer.getvalue()).graph


def _adapter_keys(group: Group, index: int) -> list[str]:
    """The adapter's own state tensors of a layer (the drift observer's are staged after)."""
    observer = init_observer(SourceStats(torch.zeros(1), torch.ones(1), 1e-5, 0.1))
    return [k for k in group.layers[index] if k not in observer]


def _graph_name(index: int, name: str) -> str:
    """Where a traced layer's own input or output goes in the fused graph."""
    kind, _, key = name.partition(".")
    if kind == "state":
        return _state(index, key)
    if kind == "hparam":
        return _hparam(key)
    if kind == "moment":
        return _moment(index, key)
    if kind == "pixels":
        return _pixels(index)
    return PREFIX + name  # segment, images, members: shared by every layer


def _renamed(node: onnx.NodeProto, rename: Callable[[str], str], prefix: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = prefix + node.name
    copy.input[:] = [rename(name) for name in node.input]
    copy.output[:] = [rename(name) for name in node.output]
    return copy


def _renamed_info(info: onnx.ValueInfoProto, rename: Callable[[str], str]) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = rename(info.name)
    return copy


def _constants(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def _hparam(key: str) -> str:
    return f"{PREFIX}hparam/{key}"


def _state(index: int, key: str) -> str:
    return f"{PREFIX}state/{index}/{key}"


def _moment(index: int, part: str) -> str:
    return f"{PREFIX}moments/{index}/{part}"


def _pixels(index: int) -> str:
    return f"{PREFIX}pixels/{index}"
