"""Engine throughput: the adapted forward against the plain eval forward of the same model.

    uv run python -m bench.engine [--device cuda] [--model cifar10_resnet20] [--backend onnx]

For every adapter and batch size it times the adapted forward and the plain ``model(x)``
back to back, many times, and reports the median of the per-pair ratios (this machine is noisy:
ratios measured in one run are what we compare). Then 64 streams mixed in one batch of 256
against one stream of 256 and against a loop of 64 calls of 4 images. Writes a section of
docs/performance.md and a PNG plot.

``--mode compiled`` counts ATen ops per eager forward (adapted vs plain, per adapter), inductor
kernels per compiled forward, and times the compiled adapted forward against the compiled plain
one and against the eager adapted one, then 256 x 1, 64 x 4 and 1 x 256 streams
(engine/compiled.py).

``--mode fastest`` is the GPU matrix of issue 17: the adapted forward against the plain one, both
in their fastest form (``torch.compile``d, and on CUDA replayed as captured graphs: the plain one
through inductor's ``reduce-overhead``, the engine's through its own capture), per dtype (fp32
and the autocast ones named by ``--dtypes``) and batch size, with images/s.

``--backend onnx`` times the ONNX Runtime backend instead: the model exported by
``models.export_onnx``, the adapted forward of both designs (fused graph, cut graph) against
the untouched file in ONNX Runtime (BN constants, ORT's fusions on), and the fused design
against the PyTorch engine's adapted forward.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from engine.onnx_backend import Design

from adapters import ADAPTERS
from bench.report import command_line, machine, write_section
from engine.core import Engine, StreamHandle
from engine.network import Network
from models import WeightsUnavailableError, create_model, get_spec
from models.registry import build_architecture

log = logging.getLogger(__name__)

TARGETS = {"adabn": 1.15, "alpha_bn": 1.15, "momentum": 1.15, "unmix_tns": 1.5}
ONNX_TARGETS = {"adabn": 1.3, "alpha_bn": 1.3, "momentum": 1.3}
ONNX_DESIGNS: tuple[Design, ...] = ("fused", "segments")
ONNX_COLUMNS = ("fused/plain", "segments/plain", "fused/PyTorch")


def load(name: str, cache_dir: Path) -> tuple[torch.nn.Module, int, bool]:
    """The pretrained model, or the same architecture with random weights (same cost)."""
    try:
        model, spec = create_model(name, cache_dir=cache_dir)
        return model, spec.num_classes, True
    except WeightsUnavailableError:
        spec = get_spec(name)
        return build_architecture(spec).eval(), spec.num_classes, False


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of fn, averaged over ``calls`` calls (device-synchronised)."""

    def measure(fn: Callable[[], object], calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    return measure


def calls_for(measure, fn, budget: float) -> int:
    """How many calls fill about ``budget`` seconds (after a warm-up)."""
    for _ in range(2):
        fn()
    once = measure(fn, 1)
    return max(1, int(budget / max(once, 1e-6)))


def paired_ratio(
    measure, plain, adapted, repeats: int, budget: float
) -> tuple[float, float, float]:
    """Median ratio adapted/plain over interleaved pairs, and the median times of both."""
    # The slower of the two sets the count, so that neither measurement overruns the budget.
    calls = min(calls_for(measure, plain, budget), calls_for(measure, adapted, budget))
    ratios, plains, adapteds = [], [], []
    for _ in range(repeats):
        p = measure(plain, calls)
        a = measure(adapted, calls)
        ratios.append(a / p)
        plains.append(p)
        adapteds.append(a)
    return statistics.median(ratios), statistics.median(plains), statistics.median(adapteds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--cuda-graphs", action="store_true", help="replay captured graphs")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument(
        "--mode",
        choices=["eager", "compiled", "fastest"],
        default="eager",
        help="compiled: engine/compiled.py; fastest: compiled and graph-captured, per dtype",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(AUTOCAST),
        default=["fp32"],
        help="fastest mode: fp32 and the autocast dtypes to time",
    )
    parser.add_argument("--adapters", nargs="*", help="compiled modes: only these adapters")
    parser.add_argument("--mix-64x4", action="store_true", help="compiled mode: time 64 x 4 too")
    parser.add_argument("--no-mixing", action="store_true", help="compiled mode: skip mixing")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.25, help="seconds per timed measurement")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
    )
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model, classes, pretrained = load(args.model, args.cache_dir)
    if args.backend == "onnx":
        onnx_main(args, model, classes, pretrained, device)
        return
    if args.mode == "compiled":
        compiled_main(args, model, classes, pretrained, device)
        return
    if args.mode == "fastest":
        fastest_main(args, model, classes, pretrained, device)
        return
    images, measure, plain_model = _bench_setup(args.model, model, device)
    engine = Engine(
        model,
        name=args.model,
        num_classes=classes,
        device=device,
        capacity=128,
        cuda_graphs=args.cuda_graphs,
    )

    adapters = sorted(ADAPTERS)
    results: dict[str, dict[int, tuple[float, float, float]]] = {name: {} for name in adapters}
    jobs = [(name, b) for b in args.batch_sizes for name in adapters]
    with torch.inference_mode():
        for name, batch in tqdm(jobs, desc="adapters x batch sizes"):
            x = images(batch)
            stream = engine.open_stream(name)
            results[name][batch] = paired_ratio(
                measure,
                lambda x=x: plain_model(x),
                lambda x=x, s=stream: engine.forward(x, [(s, len(x))]).logits,
                args.repeats,
                args.budget,
            )
            engine.close_stream(stream)
            tqdm.write(f"{name} B={batch}: {results[name][batch][0]:.2f}")

        # 64 streams x 4 images in one forward vs one stream of 256 vs a loop over the streams.
        x = images(256)
        streams = [engine.open_stream("adabn") for _ in range(64)]
        single = streams[0]
        chunks = x.split(4)

        def mixed_fn() -> object:
            return engine.forward(x, [(s, 4) for s in streams]).logits

        def single_fn() -> object:
            return engine.forward(x, [(single, 256)]).logits

        def loop_fn() -> object:
            return [
                engine.forward(c, [(s, 4)]).logits for c, s in zip(chunks, streams, strict=True)
            ]

        log.info("stream mixing ...")
        mixed_vs_single, single_t, mixed_t = paired_ratio(
            measure, single_fn, mixed_fn, args.repeats, args.budget
        )
        loop_vs_mixed, _, loop_t = paired_ratio(
            measure, mixed_fn, loop_fn, args.repeats, args.budget
        )

    where = machine(device)
    key = f"bench.engine:{device.type}"
    lines = [
        f"## Engine throughput, {args.model} on {device.type.upper()}",
        "",
        f"Machine: {where}. Command: `{command_line()}`.",
        f"Weights: {'pretrained' if pretrained else 'random (same architecture and cost)'}; "
        f"median of {args.repeats} interleaved pairs per cell.",
        "",
        "Adapted forward time / plain eval forward time (lower is better; 1.00 = free):",
        "",
        "| adapter | " + " | ".join(f"B={b}" for b in args.batch_sizes) + " | target at B=256 |",
        "| --- | " + " | ".join("---" for _ in args.batch_sizes) + " | --- |",
    ]
    for name in adapters:
        cells = [f"{results[name][b][0]:.2f}" for b in args.batch_sizes]
        target = TARGETS.get(name)
        verdict = ""
        if target is not None and 256 in results[name]:
            ratio = results[name][256][0]
            verdict = f"<= {target}: {'met' if ratio <= target else 'MISSED'} ({ratio:.2f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    plain_row = [
        f"{args.batch_sizes[i] / results[adapters[0]][b][1]:.0f}"
        for i, b in enumerate(args.batch_sizes)
    ]
    lines += [
        "",
        "Plain eval forward throughput (images/s): "
        + ", ".join(f"B={b}: {p}" for b, p in zip(args.batch_sizes, plain_row, strict=True))
        + ".",
        "",
        "Stream mixing (adabn, 256 images):",
        "",
        "| layout | time per 256 images | throughput vs one stream | target |",
        "| --- | --- | --- | --- |",
        f"| one stream of 256 | {single_t * 1e3:.1f} ms | 1.00 | |",
        f"| 64 streams x 4 in one batch | {mixed_t * 1e3:.1f} ms | {1 / mixed_vs_single:.2f} | "
        f">= 0.9: {'met' if 1 / mixed_vs_single >= 0.9 else 'MISSED'} |",
        f"| loop of 64 calls x 4 images | {loop_t * 1e3:.1f} ms | "
        f"{1 / (mixed_vs_single * loop_vs_mixed):.3f} | "
        f"mixed >= 20x loop: {'met' if loop_vs_mixed >= 20 else 'MISSED'} ({loop_vs_mixed:.1f}x) |",
    ]
    plot = args.out.parent / f"engine-{device.type}.png"
    _plot(results, args.batch_sizes, plot, f"{args.model}, {where}")
    lines += ["", f"![adapted/plain ratio by batch size]({plot.name})"]
    write_section(args.out, key, "\n".join(lines), title="Performance")
    log.info("\n".join(lines))


def onnx_main(args, model: torch.nn.Module, classes: int, pretrained: bool, device) -> None:
    """The ONNX backend, both designs: adapted / plain ONNX Runtime, adapted ONNX / PyTorch."""
    from engine.onnx_backend import OnnxNetwork
    from models.export_onnx import to_onnx

    spec = get_spec(args.model)
    h, w = spec.input_size
    proto = to_onnx(model, (3, h, w))
    networks = {d: OnnxNetwork(proto, device, args.model, design=d) for d in ONNX_DESIGNS}
    plain = networks["fused"]
    served: dict[str, Network | torch.nn.Module] = {"torch": model}
    served.update((design, network) for design, network in networks.items())
    engines = {
        backend: Engine(net, name=args.model, num_classes=classes, device=device, capacity=16)
        for backend, net in served.items()
    }
    measure = timer(device)
    generator = torch.Generator().manual_seed(0)
    adapters = sorted(ADAPTERS)
    # ratios[column][adapter][batch]: (median ratio, median time of the reference, of ONNX)
    ratios: dict[str, dict[str, dict[int, tuple[float, float, float]]]] = {
        column: {name: {} for name in adapters} for column in ONNX_COLUMNS
    }
    jobs = [(name, b) for b in args.batch_sizes for name in adapters]
    with torch.inference_mode():
        for name, batch in tqdm(jobs, desc="adapters x batch sizes"):
            x = torch.randn((batch, 3, h, w), generator=generator).to(device)
            streams = {backend: engine.open_stream(name) for backend, engine in engines.items()}

            def adapted(backend: str, x=x, streams=streams) -> object:
                return engines[backend].forward(x, [(streams[backend], len(x))]).logits

            def source(x=x) -> object:
                return plain.forward(x, None)

            pairs: dict[str, tuple[Callable[[], object], str]] = {
                "fused/plain": (source, "fused"),
                "segments/plain": (source, "segments"),
                "fused/PyTorch": (lambda: adapted("torch"), "fused"),
            }
            for column, (reference, backend) in pairs.items():
                ratios[column][name][batch] = paired_ratio(
                    measure,
                    reference,
                    lambda backend=backend: adapted(backend),
                    args.repeats,
                    args.budget,
                )
            row = " ".join(f"{ratios[c][name][batch][0]:.2f}" for c in ONNX_COLUMNS)
            tqdm.write(f"{name} B={batch}: {row}")
    sizes = args.batch_sizes
    head = ["adapter"]
    for column in ONNX_COLUMNS:
        head += [f"{column} B={b}" for b in sizes]
        if column == "fused/plain":
            head.append("target at B=256")
    lines = [
        f"## ONNX Runtime backend, {args.model} on {device.type.upper()}",
        "",
        f"Machine: {machine(device)}. Command: `{command_line()}`. ONNX Runtime "
        f"{_ort_version()}, {plain.providers[0][0]}; {len(networks['segments'].segments)} "
        "segments in the cut graph.",
        f"Weights: {'pretrained' if pretrained else 'random (same architecture and cost)'}; "
        f"median of {args.repeats} interleaved pairs per cell; one stream of B images.",
        "",
        "Adapted forward time of each design (fused: the adapter's arithmetic in one graph, the "
        "default; segments: the graph cut at every BN node) / the untouched file in ONNX "
        "Runtime (plain: BN constants, ORT's fusions on), then the fused design / the PyTorch "
        "engine's adapted forward:",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for name in adapters:
        cells = [name]
        for column in ONNX_COLUMNS:
            cells += [f"{ratios[column][name][b][0]:.2f}" for b in sizes]
            if column == "fused/plain":
                cells.append(_verdict(ONNX_TARGETS.get(name), ratios[column][name]))
        lines.append("| " + " | ".join(cells) + " |")
    first = ratios["fused/plain"][adapters[0]]
    lines += [
        "",
        "ONNX plain forward throughput (images/s): "
        + ", ".join(f"B={b}: {b / first[b][1]:.0f}" for b in sizes)
        + ".",
    ]
    key = f"bench.engine:onnx-{device.type}"
    write_section(args.out, key, "\n".join(lines), title="Performance")
    log.info("\n".join(lines))


# --- the compiled adapted forward (engine/compiled.py) ----------------------------------------

COMPILED_TARGETS = {"adabn": 1.1, "alpha_bn": 1.1, "momentum": 1.1, "unmix_tns": 1.3}
COMPILED_B1_TARGET = 1.5
# The GPU targets of the fastest forms (issue 17): the ratio at batch 256, images/s at 1024.
FASTEST_RATIO_TARGET = 1.3
FASTEST_RATE_TARGET = 200_000
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS_PER_LAYER_TARGET = 3


def count_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """ATen ops one call of ``fn`` dispatches (``torch.profiler`` on the CPU): (top-level, all).

    Top-level ops are those the Python code calls; all counts the ops they call in turn.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(events)


def generated_kernels(fn: Callable[[], object]) -> tuple[int, int, int]:
    """What inductor generates for the first (compiling) call of ``fn``, i.e. for one forward:
    ``torch._inductor.metrics.generated_kernel_count`` (fused nodes, including those inductor
    generates while compiling and never calls), the kernel functions one forward calls, and
    the loop nests in them (on a GPU each loop nest is a kernel of its own; on the CPU one
    function runs several). Convolutions and matmuls are library calls, not counted."""
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    metrics.reset()
    _, codes = run_and_get_code(fn)  # compiles afresh: a cached graph would show no code
    calls = loops = 0
    for code in codes:
        bodies = dict(
            re.findall(r"(cpp_fused\w*) = async_compile.cpp_pybinding\(.*?r'''(.*?)'''", code, re.S)
        )
        for name in re.findall(r"\b(cpp_fused\w*)\(", code[code.index("def call(") :]):
            calls += 1
            loops += _loop_nests(bodies[name])
    return metrics.generated_kernel_count, calls, loops


def _loop_nests(body: str) -> int:
    """Outermost loops of a generated C++ kernel function (its vectorised and scalar tail
    paths share one loop; loops inside a loop are part of its nest)."""
    depth = nests = 0
    bodies: list[int] = []  # the depth inside each enclosing loop's braces
    for line in body.splitlines():
        if line.strip().startswith("for("):
            nests += not bodies
            bodies.append(depth + 1)
        depth += line.count("{") - line.count("}")
        while bodies and depth < bodies[-1] and "}" in line:
            bodies.pop()
    return nests


def _bench_setup(
    name: str, model: torch.nn.Module, device: torch.device
) -> tuple[Callable[[int], torch.Tensor], Callable, torch.nn.Module]:
    """Random images of the model's input size by batch (seeded), the timer, the plain model."""
    h, w = get_spec(name).input_size
    generator = torch.Generator().manual_seed(0)

    def images(batch: int) -> torch.Tensor:
        return torch.randn((batch, 3, h, w), generator=generator).to(device)

    return images, timer(device), model.to(device).eval()


def compiled_main(args, model: torch.nn.Module, classes: int, pretrained: bool, device) -> None:
    """Ops per forward (eager), kernels per forward (compiled), and compiled adapted / plain."""
    images, measure, plain_model = _bench_setup(args.model, model, device)
    compiled_plain = torch.compile(plain_model, dynamic=False)
    common = {"name": args.model, "num_classes": classes, "device": device, "capacity": 256}
    eager = Engine(model, **common)
    engine = Engine(model, mode="compiled", **common)
    layers = len(engine.layers)
    adapters = sorted(ADAPTERS)
    sizes = args.batch_sizes
    ops: dict[str, tuple[int, int]] = {}
    kernels: dict[str, dict[int, tuple[int, int, int]]] = {name: {} for name in adapters}
    plain_kernels: dict[int, tuple[int, int, int]] = {}
    ratios: dict[str, dict[int, tuple[float, float, float]]] = {name: {} for name in adapters}
    versus_eager: dict[str, dict[int, tuple[float, float, float]]] = {n: {} for n in adapters}
    with torch.inference_mode():
        x64 = images(64)
        ops["plain"] = count_ops(lambda: plain_model(x64))
        for name in adapters:
            stream = eager.open_stream(name)

            def run_eager(s: StreamHandle = stream) -> object:
                return eager.forward(x64, [(s, 64)]).logits

            ops[name] = count_ops(run_eager)
            eager.close_stream(stream)
        log.info("ops per forward: %s", ops)
        for batch in sizes:
            x = images(batch)

            def run_plain(x: torch.Tensor = x) -> object:
                return compiled_plain(x)

            plain_kernels[batch] = generated_kernels(run_plain)
            for name in adapters:
                if args.adapters and name not in args.adapters:
                    continue
                stream = engine.open_stream(name)
                reference = eager.open_stream(name)

                def adapted(x=x, s=stream) -> object:
                    return engine.forward(x, [(s, len(x))]).logits

                def adapted_eager(x=x, s=reference) -> object:
                    return eager.forward(x, [(s, len(x))]).logits

                start = time.perf_counter()
                kernels[name][batch] = generated_kernels(adapted)
                log.info("%s B=%d compiled in %.0f s", name, batch, time.perf_counter() - start)
                ratios[name][batch] = paired_ratio(
                    measure, lambda x=x: compiled_plain(x), adapted, args.repeats, args.budget
                )
                versus_eager[name][batch] = paired_ratio(
                    measure, adapted_eager, adapted, args.repeats, args.budget
                )
                engine.close_stream(stream)
                eager.close_stream(reference)
                tqdm.write(
                    f"{name} B={batch}: /plain {ratios[name][batch][0]:.2f} "
                    f"/eager {versus_eager[name][batch][0]:.2f} kernels {kernels[name][batch]} "
                    f"(plain {plain_kernels[batch]})"
                )

        # 256 streams of one image, 64 of 4 and one of 256, in one compiled forward each.
        x = images(256)
        layouts = {} if args.no_mixing else {"1 x 256": [256], "256 x 1": [1] * 256}
        if args.mix_64x4 and layouts:
            layouts["64 x 4"] = [4] * 64
        streams = [engine.open_stream("adabn") for _ in range(256 if layouts else 0)]
        mixing: dict[str, tuple[float, float, float]] = {}

        def run(counts: list[int]) -> object:
            return engine.forward(x, list(zip(streams, counts, strict=False))).logits

        for label, counts in layouts.items():
            run(counts)  # compiles this layout
            mixing[label] = paired_ratio(
                measure,
                lambda: run(layouts["1 x 256"]),
                lambda c=counts: run(c),
                args.repeats,
                args.budget,
            )

    where = machine(device)
    named = [n for n in adapters if kernels[n]]
    lines = [
        f"## Compiled adapted forward, {args.model} on {device.type.upper()}",
        "",
        f"Machine: {where}. Command: `{command_line()}`. torch {torch.__version__}, inductor.",
        f"Weights: {'pretrained' if pretrained else 'random (same architecture and cost)'}; "
        f"median of {args.repeats} interleaved pairs per cell; {layers} BN layers.",
        "",
        "ATen ops per forward at batch 64, eager (`torch.profiler`; top-level ops / all ops, "
        "nested included):",
        "",
        "| forward | top-level ops | all ops |",
        "| --- | --- | --- |",
        *[f"| {key} | {top} | {total} |" for key, (top, total) in ops.items()],
        "",
        "Inductor's kernels per compiled forward (convolutions and matmuls are library calls, "
        "not counted): `metrics.generated_kernel_count` (fused nodes generated, compile-time "
        "ones included) / kernel functions called per forward / loop nests in them (each a "
        "kernel of its own on a GPU); and the extra per BN layer over the compiled plain "
        f"forward (target <= {KERNELS_PER_LAYER_TARGET}):",
        "",
        "| forward | "
        + " | ".join(f"B={b}" for b in sizes)
        + " | extra per BN layer (metric / calls / loop nests) |",
        "| --- | " + " | ".join("---" for _ in sizes) + " | --- |",
        "| plain | " + " | ".join(" / ".join(map(str, plain_kernels[b])) for b in sizes) + " | |",
    ]
    for name in named:
        extra = [
            max((kernels[name][b][i] - plain_kernels[b][i]) / layers for b in sizes)
            for i in range(3)
        ]
        verdict = "met" if extra[2] <= KERNELS_PER_LAYER_TARGET else "MISSED"
        cells = " | ".join(" / ".join(map(str, kernels[name][b])) for b in sizes)
        spread = " / ".join(f"{e:.1f}" for e in extra)
        lines.append(f"| {name} | {cells} | {spread}: {verdict} (loop nests) |")
    lines += [
        "",
        "Compiled adapted forward time / compiled plain forward time (both `torch.compile`d), "
        "and / the eager adapted forward (below 1: compiled is faster):",
        "",
        "| adapter | "
        + " | ".join(f"/plain B={b}" for b in sizes)
        + " | target | "
        + " | ".join(f"/eager B={b}" for b in sizes)
        + " |",
        "| --- | "
        + " | ".join("---" for _ in sizes)
        + " | --- | "
        + " | ".join("---" for _ in sizes)
        + " |",
    ]
    for name in named:
        verdicts = []
        if 256 in ratios[name] and name in COMPILED_TARGETS:
            ratio = ratios[name][256][0]
            target = COMPILED_TARGETS[name]
            verdicts.append(f"B=256 <= {target}: {'met' if ratio <= target else 'MISSED'}")
        if 1 in ratios[name]:
            ratio = ratios[name][1][0]
            ok = ratio <= COMPILED_B1_TARGET
            verdicts.append(f"B=1 <= {COMPILED_B1_TARGET}: {'met' if ok else 'MISSED'}")
        cells = " | ".join(f"{ratios[name][b][0]:.2f}" for b in sizes)
        eager_cells = " | ".join(f"{versus_eager[name][b][0]:.2f}" for b in sizes)
        lines.append(f"| {name} | {cells} | {'; '.join(verdicts)} | {eager_cells} |")
    plain_rate = ", ".join(f"B={b}: {b / ratios[named[0]][b][1]:.0f}" for b in sizes)
    lines += ["", f"Compiled plain forward throughput (images/s): {plain_rate}."]
    if mixing:
        lines += [
            "",
            "Stream mixing, compiled (adabn, 256 images in one forward):",
            "",
            "| layout | time per 256 images | throughput vs one stream | target |",
            "| --- | --- | --- | --- |",
        ]
    for label, (ratio, _, layout_t) in mixing.items():
        goal = ""
        if label != "1 x 256":
            goal = ">= 0.9: " + ("met" if 1 / ratio >= 0.9 else "MISSED")
        lines.append(f"| {label} | {layout_t * 1e3:.1f} ms | {1 / ratio:.2f} | {goal} |")
    key = f"bench.engine:compiled-{device.type}"
    write_section(args.out, key, "\n".join(lines), title="Performance")
    log.info("\n".join(lines))


def fastest_main(args, model: torch.nn.Module, classes: int, pretrained: bool, device) -> None:
    """Adapted / plain forward, both compiled (and graph-captured on CUDA), per dtype and batch."""
    images, measure, plain_model = _bench_setup(args.model, model, device)
    cuda = device.type == "cuda"
    adapters = args.adapters or sorted(ADAPTERS)
    # (dtype, adapter, batch) -> (adapted / plain, plain s, adapted s)
    results: dict[tuple[str, str, int], tuple[float, float, float]] = {}
    for dtype in args.dtypes:
        autocast = AUTOCAST[dtype]
        compiled_plain = torch.compile(
            plain_model, mode="reduce-overhead" if cuda else None, dynamic=False
        )

        def plain(x: torch.Tensor, autocast=autocast, compiled_plain=compiled_plain) -> object:
            with torch.autocast(device.type, autocast or torch.float32, enabled=bool(autocast)):
                return compiled_plain(x)

        engine = Engine(
            model,
            name=args.model,
            num_classes=classes,
            device=device,
            capacity=256,
            mode="compiled",
            cuda_graphs=cuda,
            autocast_dtype=autocast,
        )
        with torch.inference_mode():
            for batch in args.batch_sizes:
                x = images(batch)
                for name in adapters:
                    stream = engine.open_stream(name)
                    start = time.perf_counter()
                    engine.forward(x, [(stream, batch)])  # compiles (and captures) this layout
                    log.info(
                        "%s %s B=%d ready in %.0f s",
                        dtype,
                        name,
                        batch,
                        time.perf_counter() - start,
                    )

                    def adapted(x=x, s=stream, engine=engine) -> object:
                        return engine.forward(x, [(s, len(x))]).logits

                    cell = paired_ratio(
                        measure, lambda x=x: plain(x), adapted, args.repeats, args.budget
                    )
                    results[dtype, name, batch] = cell
                    engine.close_stream(stream)
                    tqdm.write(
                        f"{dtype} {name} B={batch}: {cell[0]:.2f}, {batch / cell[2]:,.0f} images/s"
                    )
    lines = _fastest_report(args, device, machine(device), pretrained, adapters, results)
    # one section per device, dtypes and adapters: runs of other dtypes or adapters sit beside it
    key = "-".join(["bench.engine:fastest", device.type, *args.dtypes, *adapters])
    write_section(args.out, key, "\n".join(lines), title="Performance")
    log.info("\n".join(lines))


def _fastest_report(
    args,
    device: torch.device,
    where: str,
    pretrained: bool,
    adapters: list[str],
    results: dict[tuple[str, str, int], tuple[float, float, float]],
) -> list[str]:
    """The fastest-forms section: ratio and images/s per dtype, adapter and batch, with targets."""
    cuda = device.type == "cuda"
    sizes = args.batch_sizes
    form = "compiled, captured as CUDA graphs" if cuda else "compiled (no graphs on the CPU)"
    lines = [
        f"## Fastest forms, {args.model} on {device.type.upper()} "
        f"({', '.join(args.dtypes)}; {', '.join(adapters)})",
        "",
        f"Machine: {where}. Command: `{command_line()}`. torch {torch.__version__}.",
        f"Weights: {'pretrained' if pretrained else 'random (same architecture and cost)'}; both "
        f"forwards {form}; median of {args.repeats} interleaved pairs per cell. Targets (issue "
        f"17, GPU): adapted / plain <= {FASTEST_RATIO_TARGET} at batch 256; >= "
        f"{FASTEST_RATE_TARGET:,} adapted images/s at batch 1024.",
        "",
        "| dtype | adapter | "
        + " | ".join(f"B={b} /plain | B={b} images/s" for b in sizes)
        + " | targets |",
        "| --- | --- | " + " | ".join("--- | ---" for _ in sizes) + " | --- |",
    ]
    for dtype in args.dtypes:
        for name in adapters:
            cells = [results[dtype, name, b] for b in sizes]
            verdicts = []
            if 256 in sizes:
                ratio = results[dtype, name, 256][0]
                ok = ratio <= FASTEST_RATIO_TARGET
                verdicts.append(f"B=256 <= {FASTEST_RATIO_TARGET}: {'met' if ok else 'MISSED'}")
            if 1024 in sizes:
                rate = 1024 / results[dtype, name, 1024][2]
                ok = rate >= FASTEST_RATE_TARGET
                verdicts.append(f"B=1024 >= {FASTEST_RATE_TARGET:,}/s: {'met' if ok else 'MISSED'}")
            row = " | ".join(
                f"{r:.2f} | {b / a:,.0f}" for b, (r, _, a) in zip(sizes, cells, strict=True)
            )
            lines.append(f"| {dtype} | {name} | {row} | {'; '.join(verdicts)} |")
    lines.append("")
    for dtype in args.dtypes:
        rates = ", ".join(f"B={b}: {b / results[dtype, adapters[0], b][1]:,.0f}" for b in sizes)
        lines.append(f"Plain forward, {dtype} (images/s): {rates}.")
    return lines


def _verdict(target: float | None, by_batch: dict[int, tuple[float, float, float]]) -> str:
    """``<= target: met (ratio)`` at batch 256, empty without a target or that batch."""
    if target is None or 256 not in by_batch:
        return ""
    ratio = by_batch[256][0]
    return f"<= {target}: {'met' if ratio <= target else 'MISSED'} ({ratio:.2f})"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _plot(results, batch_sizes, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_batch in results.items():
        ax.plot(batch_sizes, [by_batch[b][0] for b in batch_sizes], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("batch size")
    ax.set_ylabel("adapted / plain forward time")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
