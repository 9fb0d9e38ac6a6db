"""The engine's mixed batches against the one-model-copy-per-stream reference, sample for sample."""

from __future__ import annotations

import torch

from engine.core import Engine
from tests.adapters.conftest import images, tiny_net
from tests.adapters.reference import reference_model

STREAMS = [
    ("source", {}),
    ("tbn", {}),
    ("adabn", {}),
    ("adabn", {"prior_images": 3.0}),
    ("alpha_bn", {}),
    ("alpha_bn", {"alpha": 0.7, "unbiased": True}),
    ("unmix_tns", {}),
    ("unmix_tns", {"components": 3, "tau": 0.5, "batch_size_max": 4}),
    ("unmix_tns", {"components": 1}),
    ("momentum", {}),
    ("momentum", {"eta0": 0.3, "beta": 0.2, "batch_ref": 2.0}),
]


def test_mixed_batches_match_the_per_stream_reference() -> None:
    """Rounds of one batch mixing 11 streams of 6 adapters, sizes 1-4 (N = 1 included)."""
    net = tiny_net(seed=1)
    engine = Engine(net, num_classes=5)
    handles = [
        engine.open_stream(name, config, seed=100 + i) for i, (name, config) in enumerate(STREAMS)
    ]
    references = [
        reference_model(net, name, config, seed=100 + i) for i, (name, config) in enumerate(STREAMS)
    ]
    for round_ in range(4):
        sizes = [1 + (i + round_) % 4 for i in range(len(STREAMS))]
        chunks = [
            images(n, seed=1000 * round_ + i, shift=0.3 * (i % 3)) for i, n in enumerate(sizes)
        ]
        got = engine.forward(torch.cat(chunks), list(zip(handles, sizes, strict=True))).logits
        expected = torch.cat([ref(chunk) for ref, chunk in zip(references, chunks, strict=True)])
        for i, (name, _) in enumerate(STREAMS):
            start, stop = sum(sizes[:i]), sum(sizes[: i + 1])
            torch.testing.assert_close(
                got[start:stop],
                expected[start:stop],
                rtol=1e-4,
                atol=1e-4,
                msg=lambda m, i=i, name=name, r=round_: f"round {r}, stream {i} ({name}): {m}",
            )


def test_stream_order_in_the_batch_does_not_matter() -> None:
    """Segments given out of pool order are regrouped and the logits come back in input order."""
    net = tiny_net(seed=2)
    first, second = Engine(net, num_classes=5), Engine(net, num_classes=5)
    kinds = ["adabn", "unmix_tns", "adabn", "momentum"]
    a = [first.open_stream(kind, seed=i) for i, kind in enumerate(kinds)]
    b = [second.open_stream(kind, seed=i) for i, kind in enumerate(kinds)]
    x = images(10, seed=3, shift=0.5)
    sizes = [3, 2, 4, 1]
    mixed = first.forward(x, list(zip(a, sizes, strict=True))).logits
    offsets = [0, 3, 5, 9]
    alone = torch.cat(
        [
            second.forward(x[o : o + n], [(h, n)]).logits
            for h, o, n in zip(b, offsets, sizes, strict=True)
        ]
    )
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
