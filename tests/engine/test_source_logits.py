"""The source logits of flagged segments come out of the same forward as the adapted ones."""

from __future__ import annotations

import torch

from engine import Engine
from tests.adapters.conftest import images, tiny_net


def test_source_logits_match_the_source_model_and_change_nothing_else() -> None:
    net = tiny_net()
    engine, twin = (Engine(net, num_classes=5) for _ in range(2))
    streams = [engine.open_stream("adabn", seed=1), engine.open_stream("alpha_bn", seed=2)]
    twins = [twin.open_stream("adabn", seed=1), twin.open_stream("alpha_bn", seed=2)]
    x = torch.cat([images(3, seed=1, shift=2.0), images(4, seed=2, shift=-1.0)])

    flagged = engine.forward(x, [(streams[0], 3), (streams[1], 4)], source=[False, True])
    plain = twin.forward(x, [(twins[0], 3), (twins[1], 4)])

    assert flagged.source_logits is not None
    torch.testing.assert_close(flagged.source_logits, engine.forward_source(x[3:]))
    torch.testing.assert_close(flagged.logits, plain.logits)
    for mine, theirs in zip(streams, twins, strict=True):
        assert engine.export_stream(mine) == twin.export_stream(theirs)
    assert plain.source_logits is None
