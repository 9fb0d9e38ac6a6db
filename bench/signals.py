"""Measure the drift signals of clean and corrupted CIFAR-10 streams, to calibrate the thresholds.

Each stream is one real-model engine stream (the server's default adapter and config) fed
``--batch`` test images per forward, like a client's requests; after each checkpoint the stream's
drift summary (the one the server's metrics are computed from) is printed: early/late-layer drift
(Jeffreys), normalised entropy, confidence, dominant-class share, and the accuracy so far. Clean
streams start at different offsets of the test set, so their spread shows in the table.

    python -m bench.signals --images 500 --checkpoints 100,250,500
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.engine import Engine
from bench.corruptions import corrupt
from bench.data import load_cifar10
from models import create_model, get_spec, normalize
from service.settings import Settings

# (name, corruption, severity, offset into the test set); corruption None: clean images.
STREAMS = (
    ("clean-a", None, 0, 0),
    ("clean-b", None, 0, 2500),
    ("clean-c", None, 0, 5000),
    ("clean-d", None, 0, 7500),
    ("jpeg_compression-1", "jpeg_compression", 1, 0),
    ("brightness-1", "brightness", 1, 0),
    ("gaussian_noise-1", "gaussian_noise", 1, 0),
    ("fog-3", "fog", 3, 0),
    ("contrast-5", "contrast", 5, 0),
    ("shot_noise-5", "shot_noise", 5, 0),
    ("impulse_noise-5", "impulse_noise", 5, 0),
    ("gaussian_noise-5", "gaussian_noise", 5, 0),
)


@dataclass(frozen=True)
class Row:
    """One stream's signals after ``images`` images."""

    stream: str
    images: int
    drift_early: float
    drift_late: float
    entropy: float
    confidence: float
    dominant_share: float
    accuracy: float


def measure(
    engine: Engine,
    images: np.ndarray,
    labels: np.ndarray,
    name: str,
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
        logits = engine.forward(normalize(pixels, spec), [(handle, pixels.shape[0])])
        correct += int((logits.argmax(1).cpu().numpy() == labels[start : start + batch]).sum())
        seen = start + pixels.shape[0]
        if seen in checkpoints:
            (summary,) = engine.drift_summaries([handle])
            yield Row(
                name,
                seen,
                summary["early"]["jeffreys"],
                summary["late"]["jeffreys"],
                summary["entropy_normalized"],
                summary["confidence"],
                summary["dominant_class_share"],
                correct / seen,
            )
    engine.close_stream(handle)


def main(argv: list[str] | None = None) -> None:
    """Print the signals table (Markdown) of every stream of :data:`STREAMS`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--images", type=int, default=500, help="images per stream")
    parser.add_argument(
        "--adapter", default=None, help="adapter of the streams (default: the server's default)"
    )
    parser.add_argument("--batch", type=int, default=16, help="images per forward")
    parser.add_argument("--checkpoints", default="100,250,500", help="image counts to report at")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar10"))
    parser.add_argument("--data-cache", type=Path, default=Path(".cache/data"))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
        help="model weights cache",
    )
    args = parser.parse_args(argv)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")} | {args.images})
    if any(c % args.batch for c in checkpoints):
        parser.error("every checkpoint must be a multiple of --batch")
    settings = Settings()
    if args.adapter is None or args.adapter == settings.default_adapter:
        adapter = (settings.default_adapter, settings.default_adapter_config)
    else:
        adapter = (args.adapter, {})
    torch.set_grad_enabled(False)
    model, spec = create_model(args.model, cache_dir=args.cache_dir)
    engine = Engine(
        model,
        name=spec.name,
        num_classes=spec.num_classes,
        observer_window=settings.observer_window,
    )
    clean, labels = load_cifar10("test", args.data_dir, args.data_cache)
    print(
        f"model {args.model}, adapter {adapter[0]} {adapter[1]}, {args.batch} images per forward; "
        f"CPU: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}"
    )
    print()
    print(
        "| stream | images | drift early | drift late | entropy (norm.) | confidence "
        "| dominant share | accuracy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, corruption, severity, offset in STREAMS:
        x = clean[offset : offset + args.images]
        y = labels[offset : offset + args.images]
        if corruption is not None:
            x = corrupt(x, corruption, severity, seed=0, start=offset)
        for row in measure(engine, x, y, name, adapter, args.batch, checkpoints):
            print(
                f"| {row.stream} | {row.images} | {row.drift_early:.3f} | {row.drift_late:.3f} "
                f"| {row.entropy:.3f} | {row.confidence:.3f} | {row.dominant_share:.3f} "
                f"| {row.accuracy:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
