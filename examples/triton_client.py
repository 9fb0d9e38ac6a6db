"""Triton's own Python client (tritonclient.http), unmodified, against tta-serve's /v2 routes.

Stateless inference (the source model), then a Triton sequence: ``sequence_start`` creates the
stream (the server's default adapter), each request adapts it, ``sequence_end`` ends it (the
server deletes it, or keeps it with TTA_OIP_SEQUENCE_END=keep). README, Protocols.

    uv run python examples/triton_client.py --url 127.0.0.1:8000

Needs ``tritonclient[http]`` (a dev dependency of the project).
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.http as httpclient

MODEL = "cifar10_resnet20"


def main() -> None:
    """Run the stateless request, then a five-request sequence."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of tta-serve")
    parser.add_argument("--sequence", type=int, default=7, help="Triton sequence id")
    args = parser.parse_args()
    client = httpclient.InferenceServerClient(args.url)
    print("live", client.is_server_live(), "ready", client.is_model_ready(MODEL))
    rng = np.random.default_rng(0)
    tensor = httpclient.InferInput("input", [4, 3, 32, 32], "UINT8")
    outputs = [httpclient.InferRequestedOutput("label")]
    tensor.set_data_from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    stateless = client.infer(MODEL, [tensor], outputs=outputs)
    print("stateless:", [label.decode() for label in stateless.as_numpy("label")])
    for step in range(5):
        tensor.set_data_from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
        result = client.infer(
            MODEL,
            [tensor],
            outputs=outputs,
            sequence_id=args.sequence,
            sequence_start=step == 0,
            sequence_end=step == 4,
        )
        labels = [label.decode() for label in result.as_numpy("label")]
        print(f"sequence {args.sequence} step {step}:", labels, result.get_response()["parameters"])


if __name__ == "__main__":
    main()
