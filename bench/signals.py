"""Measure the drift signals of clean and corrupted CIFAR-10 streams, to calibrate the thresholds.

Each stream is one real-model engine stream fed ``--batch`` test images per forward, like a
client's requests. At each checkpoint the table shows the stream's drift summary, the one the
server's metrics are computed from (early/late-layer drift, normalised entropy, confidence,
dominant-class share), its accuracy so far, and the trouble reasons the settings' thresholds
give. Clean streams start at different offsets of the test set, so their spread shows. A summary
compares the clean streams' largest values with the severe corruptions' smallest, per signal.

    python -m bench.signals                      # the default adapter, into docs/metrics.md
    python -m bench.signals --adapter adabn      # the fallback default (models with many classes)
    python -m bench.signals --adapter source     # the unadapted model, for comparison
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.presets import preset_config
from bench.corruptions import corrupt
from bench.data import load_cifar10
from bench.report import command_line, machine, table, write_section
from engine.core import Engine
from models import create_model, get_spec, normalize
from service.main import trouble_thresholds
from service.metrics import StreamSignal, TroubleThresholds
from service.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


@dataclass(frozen=True)
class SignalStream:
    """A measured stream: its group, its images' corruption, and where in the test set it starts."""

    name: str
    group: str  # clean | mild | drift | severe | stuck
    corruption: str | None  # None: clean images; "stuck": the first image, repeated
    severity: int
    offset: int


STREAMS = (
    SignalStream("clean-a", "clean", None, 0, 0),
    SignalStream("clean-b", "clean", None, 0, 2500),
    SignalStream("clean-c", "clean", None, 0, 5000),
    SignalStream("clean-d", "clean", None, 0, 7500),
    SignalStream("jpeg_compression-1", "mild", "jpeg_compression", 1, 0),
    SignalStream("brightness-1", "mild", "brightness", 1, 0),
    SignalStream("gaussian_noise-1", "mild", "gaussian_noise", 1, 0),
    SignalStream("fog-3", "drift", "fog", 3, 0),
    SignalStream("fog-4", "drift", "fog", 4, 0),
    SignalStream("contrast-5", "severe", "contrast", 5, 0),
    SignalStream("shot_noise-5", "severe", "shot_noise", 5, 0),
    SignalStream("impulse_noise-5", "severe", "impulse_noise", 5, 0),
    SignalStream("gaussian_noise-5", "severe", "gaussian_noise", 5, 0),
    SignalStream("stuck-camera", "stuck", "stuck", 0, 0),
)


@dataclass(frozen=True)
class Row:
    """One stream's signals after ``images`` images."""

    stream: SignalStream
    images: int
    signal: StreamSignal
    accuracy: float


def stream_images(
    stream: SignalStream, clean: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The stream's ``count`` images (uint8 NHWC) and labels."""
    if stream.corruption == "stuck":
        first = slice(stream.offset, stream.offset + 1)
        return np.repeat(clean[first], count, 0), np.repeat(labels[first], count, 0)
    images = clean[stream.offset : stream.offset + count]
    if stream.corruption is not None:
        images = corrupt(images, stream.corruption, stream.severity, seed=0, start=stream.offset)
    return images, labels[stream.offset : stream.offset + count]


def measure(
    engine: Engine,
    stream: SignalStream,
    images: np.ndarray,
    labels: np.ndarray,
    adapter: tuple[str, dict],
    batch: int,
    checkpoints: list[int],
) -> Iterator[Row]:
    """Feed one stream ``images`` in batches; its signals at each checkpoint."""
    handle = engine.open_stream(*adapter, seed=0)
    spec = get_spec(engine.name)
    correct = 0
    for start in range(0, max(checkpoints), batch):
        pixels = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).contiguous()
        logits = engine.forward(normalize(pixels, spec), [(handle, pixels.shape[0])]).logits
        correct += int((logits.argmax(1).cpu().numpy() == labels[start : start + batch]).sum())
        seen = start + pixels.shape[0]
        if seen in checkpoints:
            (summary,) = engine.drift_summaries([handle])
            signal = StreamSignal.of(summary, 0.0)
            if signal is not None:  # the stream adapted: the observer has images
                yield Row(stream, seen, signal, correct / seen)
    engine.close_stream(handle)


def summary(rows: list[Row], thresholds: TroubleThresholds) -> str:
    """Per signal: the clean streams' extreme, the severe ones' range, and the threshold."""
    counted = [row for row in rows if row.images >= thresholds.min_images]

    def values(group: str, name: str) -> list[float]:
        return [getattr(r.signal, name) for r in counted if r.stream.group == group]

    lines = []
    # (signal, attribute, threshold, whether trouble is above it)
    for label, name, threshold, above in (
        ("drift early", "drift_early", thresholds.drift_early, True),
        ("drift late", "drift_late", thresholds.drift_late, True),
        ("entropy (high)", "entropy", thresholds.entropy_high, True),
        ("entropy (low)", "entropy", thresholds.entropy_low, False),
        ("dominant share", "dominant_share", thresholds.dominant_share, True),
    ):
        clean, severe = values("clean", name), values("severe", name)
        nearest = max(clean) if above else min(clean)
        lines.append(
            (
                label,
                f"{'max' if above else 'min'} {nearest:.3f}",
                # the severe corruptions do not collapse: their low-entropy range means nothing
                f"{min(severe):.3f} to {max(severe):.3f}" if above else "-",
                f"{'>' if above else '<'} {threshold:g}",
            )
        )
    header = ("signal", "clean streams", "severe streams", "in trouble when")
    groups = ("clean", "mild", "drift", "severe", "stuck")
    verdicts = []
    for group in groups:
        mine = [r for r in counted if r.stream.group == group]
        troubled = sum(1 for r in mine if thresholds.reasons(r.signal))
        verdicts.append(f"{group} {troubled} of {len(mine)}")
    return (
        table(header, lines)
        + f"\n\nRows in trouble, from {thresholds.min_images:g} images on: "
        + ", ".join(verdicts)
        + "."
    )


def main(argv: list[str] | None = None) -> None:
    """Measure every stream of :data:`STREAMS`; write the tables into a section of the doc."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument(
        "--adapter", default=None, help="adapter of the streams (default: the server's default)"
    )
    parser.add_argument("--batch", type=int, default=16, help="images per forward")
    parser.add_argument(
        "--checkpoints", default="32,64,128,256,512,992", help="image counts to report at"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar10"))
    parser.add_argument("--data-cache", type=Path, default=Path(".cache/data"))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
        help="model weights cache",
    )
    parser.add_argument("--out", type=Path, default=DOC, help="markdown file to write into")
    args = parser.parse_args(argv)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})
    if any(c % args.batch for c in checkpoints):
        parser.error("every checkpoint must be a multiple of --batch")
    settings = Settings()
    name = args.adapter or settings.default_adapter
    defaults = dict(settings.default_adapters())  # the default's and the fallback's configs
    adapter = (name, preset_config(name, None, defaults.get(name)))
    thresholds = trouble_thresholds(settings)
    torch.set_grad_enabled(False)
    model, spec = create_model(args.model, cache_dir=args.cache_dir)
    engine = Engine(
        model,
        name=spec.name,
        num_classes=spec.num_classes,
        observer_window=settings.observer_window,
    )
    clean, labels = load_cifar10("test", args.data_dir, args.data_cache)
    rows: list[Row] = []
    for stream in STREAMS:
        images, truth = stream_images(stream, clean, labels, max(checkpoints))
        rows += measure(engine, stream, images, truth, adapter, args.batch, checkpoints)
    header = (
        "stream", "group", "images", "drift early", "drift late", "entropy", "confidence",
        "dominant share", "accuracy", "in trouble",
    )  # fmt: skip
    cells = [
        (
            r.stream.name,
            r.stream.group,
            r.images,
            f"{r.signal.drift_early:.3f}",
            f"{r.signal.drift_late:.3f}",
            f"{r.signal.entropy:.3f}",
            f"{r.signal.confidence:.3f}",
            f"{r.signal.dominant_share:.3f}",
            f"{r.accuracy:.3f}",
            ", ".join(thresholds.reasons(r.signal)) or "-",
        )
        for r in rows
    ]
    body = "\n".join(
        [
            f"Signals of {args.model} streams with the adapter `{adapter[0]}` {adapter[1]}, "
            f"{args.batch} images per forward, window {settings.observer_window} images. "
            f"Measured on {machine()} by `{command_line()}`.",
            "",
            summary(rows, thresholds),
            "",
            "<details><summary>Every stream at every checkpoint</summary>",
            "",
            table(header, cells),
            "",
            "</details>",
        ]
    )
    write_section(args.out, f"signals-{adapter[0]}", body, title="Metrics")
    print(body)


if __name__ == "__main__":
    main()
