"""Label feedback against an offline computation: the live accuracy equals the offline one.

A stream with feedback on (adabn) gets the continual protocol's batches of CIFAR-10-C through the
API of an in-process app (httpx's ASGI transport, no port), and every image's true label is sent
back by request id and index. Offline, an engine of its own replays the same batches on a stream
of the same adapter and scores the same labels, and the source model predicts the same images.
The two accuracies (adapted and source) must be equal; the section says by how much they differ.

    uv run python -m bench.feedback --n 100 --device cpu
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.accuracy import build_protocol, load_pool
from bench.corruptions import CORRUPTIONS
from bench.report import command_line, machine, table, write_section
from engine.core import Engine
from models import Normalizer, create_model
from service.main import create_app
from service.settings import Settings


async def live(
    args: argparse.Namespace, pixels: list[np.ndarray], labels: list[np.ndarray]
) -> dict:
    """The server's live accuracy after every batch's labels, and its adapted classes."""
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(
            store="memory",
            data_dir=Path(data),
            model_cache_dir=args.cache_dir,
            models=[args.model],
            feedback_window=sum(len(b) for b in labels),
            log_level="warning",
        )
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", timeout=600
            ) as client,
        ):
            created = await client.post(
                "/v1/streams", json={"id": "feedback", "adapter": args.adapter, "feedback": True}
            )
            created.raise_for_status()
            classes = []
            for batch, truth in zip(pixels, labels, strict=True):
                response = await client.post(
                    "/v1/streams/feedback/predict",
                    content=batch.tobytes(),
                    params={"shape": ",".join(map(str, batch.shape)), "drift": "false"},
                    headers={"content-type": "application/octet-stream"},
                )
                response.raise_for_status()
                body = response.json()
                classes += [p["index"] for p in body["predictions"]]
                rid = body["request_id"]
                sent = [
                    {"request_id": rid, "index": i, "label": int(y)} for i, y in enumerate(truth)
                ]
                posted = await client.post("/v1/streams/feedback/feedback", json={"labels": sent})
                posted.raise_for_status()
            return {"accuracy": posted.json()["accuracy"], "classes": classes}


def main() -> None:
    """Feed the stream, score it offline, and write the section."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar10_resnet20")
    p.add_argument("--adapter", default="adabn")
    p.add_argument("--n", type=int, default=100, help="images per corruption")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), default=list(CORRUPTIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/safety.md"))
    p.add_argument("--section", default="feedback")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar10"))
    p.add_argument("--data-cache", type=Path, default=Path(".cache/data"))
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pool = load_pool(args, args.severity, device)
    protocol = build_protocol("continual", pool.domains, pool.labels, args.seed, args.batch)
    batches = protocol.streams[0]
    pixels = [pool.images[torch.from_numpy(b)].cpu().numpy() for b in batches]
    labels = [pool.labels[b] for b in batches]
    served = asyncio.run(live(args, pixels, labels))

    model, spec = create_model(args.model, cache_dir=args.cache_dir)
    engine = Engine(model, name=args.model, num_classes=10, device=device)
    normalizer = Normalizer(spec)
    stream = engine.open_stream(args.adapter)
    adapted, source = [], []
    for batch in batches:
        x = normalizer(pool.images[torch.from_numpy(batch)])
        adapted += engine.forward(x, [(stream, len(batch))]).logits.argmax(1).tolist()
        source += engine.forward_source(x).argmax(1).tolist()
    truth = np.concatenate(labels)
    offline_adapted = float(np.mean(np.array(adapted) == truth))
    offline_source = float(np.mean(np.array(source) == truth))
    live_accuracy = served["accuracy"]
    differing = int(np.sum(np.array(adapted) != np.array(served["classes"])))
    rows = [
        ["adapted", f"{live_accuracy['adapted']:.6f}", f"{offline_adapted:.6f}"],
        ["source", f"{live_accuracy['source']:.6f}", f"{offline_source:.6f}"],
    ]
    body = "\n".join(
        [
            f"Machine: {machine(device)}. Command: `{command_line()}`.",
            "",
            f"Model {args.model}, adapter {args.adapter}, continual protocol: {len(truth)} images "
            f"({args.n} per corruption, severity {args.severity}, B = {args.batch}), every one "
            f"labelled. Live: the stream's view after the last labels "
            f"({live_accuracy['labels']} labelled images in its window). Offline: an engine of "
            f"its own on the same batches. Adapted predictions that differ between the server "
            f"and the offline engine: {differing} of {len(truth)}.",
            "",
            table(["prediction", "live accuracy (server)", "offline accuracy"], rows),
        ]
    )
    write_section(args.out, args.section, body, title="Stream safety and feedback")
    print(body)


if __name__ == "__main__":
    main()
