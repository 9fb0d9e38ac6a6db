"""A tta-serve client in Python (httpx): one stream, a folder of images, predictions and drift.

Creates the stream (or reuses it), sends the folder's images in batches, prints each image's
prediction, then the stream's drift summary, and exports the stream's state to a file that
``PUT /v1/streams/{id}/state`` (or ``tta-serve import-state``) loads into any server.

    uv run python examples/client.py IMAGES_DIR --url http://127.0.0.1:8000 --stream camera-7

No images at hand? ``--make 16`` writes 16 random 32x32 PNGs into IMAGES_DIR first.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import httpx

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` random 32x32 RGB PNGs into ``folder`` (for a first try)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        pixels = bytes(rng.randrange(256) for _ in range(32 * 32 * 3))
        Image.frombytes("RGB", (32, 32), pixels).save(folder / f"image-{index:03d}.png")


def ensure_stream(client: httpx.Client, stream: str, model: str | None, adapter: str) -> None:
    """Create the stream with the adapter's recommended preset; keep it if it exists."""
    body = {"id": stream, "adapter": adapter} | ({"model": model} if model else {})
    response = client.post("/v1/streams", json=body)
    if response.status_code == 409:
        print(f"stream {stream} exists: adapting it further")
        return
    response.raise_for_status()
    created = response.json()
    print(f"created stream {stream}: {created['model']}, {created['adapter']} {created['config']}")


def main() -> None:
    """Parse the arguments and run the walkthrough."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of images (jpg, png, ...)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the tta-serve server")
    parser.add_argument("--stream", default="camera-7", help="the stream's id")
    parser.add_argument("--model", help="a served model (default: the server's first)")
    parser.add_argument("--adapter", default="adabn", help="GET /v1/adapters lists them")
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--export", type=Path, help="state file (default: STREAM.safetensors)")
    parser.add_argument("--make", type=int, default=0, help="first write this many random PNGs")
    args = parser.parse_args()
    if args.make:
        make_images(args.folder, args.make)
    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        parser.error(f"no images in {args.folder} (try --make 16)")
    with httpx.Client(base_url=args.url, timeout=60) as client:
        ensure_stream(client, args.stream, args.model, args.adapter)
        for start in range(0, len(files), args.batch):
            batch = files[start : start + args.batch]
            response = client.post(
                f"/v1/streams/{args.stream}/predict",
                files=[("images", (p.name, p.read_bytes())) for p in batch],
            )
            response.raise_for_status()
            for path, prediction in zip(batch, response.json()["predictions"], strict=True):
                print(f"{path.name}\t{prediction['label']}\t{prediction['probability']:.3f}")
        drift = client.get(f"/v1/streams/{args.stream}/drift").json()
        print(
            f"drift after {drift['images']:.0f} images: early {drift['early']['jeffreys']:.3f}, "
            f"late {drift['late']['jeffreys']:.3f} (Jeffreys), "
            f"entropy {drift['entropy']:.3f}, confidence {drift['confidence']:.3f}"
        )
        state = client.get(f"/v1/streams/{args.stream}/state")
        state.raise_for_status()
        output = args.export or Path(f"{args.stream}.safetensors")
        output.write_bytes(state.content)
        print(f"exported the stream's state to {output} ({len(state.content)} bytes)")


if __name__ == "__main__":
    main()
