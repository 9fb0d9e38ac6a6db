"""The contract every registered adapter keeps (parametrized over the registry itself)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from adapters import ADAPTERS, StateMismatchError, UnknownAdapterError, get_adapter
from adapters.presets import PRESETS, preset_config
from engine.core import Engine
from tests.adapters.conftest import images, tiny_net

NAMES = sorted(ADAPTERS)
# every adapter under each of its named presets (the configs users pick by name)
PRESET_CONFIGS = [
    pytest.param(name, preset_config(name, preset), id=f"{name}-{preset}")
    for name in NAMES
    for preset in PRESETS[name]
]


class Tripwire(nn.Module):
    """Raises in the middle of the network when armed: a batch that fails after some BN layers."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("tripwire")
        return x


def tripwired_net() -> tuple[nn.Module, Tripwire]:
    net = tiny_net()
    wire = Tripwire()
    net.insert(5, wire)  # after the residual block, before the last BN layer
    return net, wire


def snapshot(engine: Engine, *streams) -> list[bytes]:
    return [engine.export_stream(s) for s in streams]


@pytest.mark.parametrize(("name", "config"), PRESET_CONFIGS)
def test_shapes_and_finite(name: str, config: dict) -> None:
    engine = Engine(tiny_net(), num_classes=5)
    stream = engine.open_stream(name, config)
    for n in (1, 4, 9):
        logits = engine.forward(images(n, n, shift=1.0), [(stream, n)]).logits
        assert logits.shape == (n, 5)
        assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize(("name", "config"), PRESET_CONFIGS)
def test_streams_are_isolated(name: str, config: dict) -> None:
    """Another stream's batches, alone or in the same forward, never move this stream."""
    engine = Engine(tiny_net(), num_classes=5)
    a, b = engine.open_stream(name, config, seed=1), engine.open_stream(name, config, seed=2)
    engine.forward(images(3, 0), [(a, 3)])
    before = snapshot(engine, a)
    engine.forward(images(5, 1, shift=2.0), [(b, 5)])
    assert snapshot(engine, a) == before
    solo = Engine(tiny_net(), num_classes=5)
    c = solo.open_stream(name, config, seed=1)
    solo.forward(images(3, 0), [(c, 3)])
    x = images(4, 2, shift=1.0)
    together = engine.forward(torch.cat([x, images(6, 3, shift=3.0)]), [(a, 4), (b, 6)]).logits
    torch.testing.assert_close(together[:4], solo.forward(x, [(c, 4)]).logits)


@pytest.mark.parametrize("name", NAMES)
def test_reset_restores_the_fresh_state(name: str) -> None:
    engine = Engine(tiny_net(), num_classes=5)
    stream = engine.open_stream(name, seed=5)
    fresh = snapshot(engine, stream)
    x = images(6, 0, shift=1.5)
    first = engine.forward(x, [(stream, 6)]).logits
    engine.forward(images(6, 1, shift=-1.0), [(stream, 6)])
    engine.reset_stream(stream)
    assert snapshot(engine, stream) == fresh
    torch.testing.assert_close(engine.forward(x, [(stream, 6)]).logits, first, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_export_import_round_trip(name: str) -> None:
    engine = Engine(tiny_net(), name="tiny", num_classes=5)
    stream = engine.open_stream(name)
    engine.forward(images(5, 0, shift=1.0), [(stream, 5)])
    data = engine.export_stream(stream)
    other = Engine(tiny_net(), name="tiny", num_classes=5)
    copy = other.import_stream(other.open_stream(name), data)
    assert other.export_stream(copy) == data
    x = images(3, 9, shift=0.5)
    torch.testing.assert_close(
        other.forward(x, [(copy, 3)]).logits, engine.forward(x, [(stream, 3)]).logits
    )


@pytest.mark.backends("torch")  # a module that raises; ONNX: tests/engine/test_onnx.py
@pytest.mark.parametrize("name", NAMES)
def test_failed_batch_changes_nothing(name: str) -> None:
    net, wire = tripwired_net()
    engine = Engine(net, num_classes=5)
    wire = next(m for m in engine.network.model.modules() if isinstance(m, Tripwire))
    a, b = engine.open_stream(name), engine.open_stream(name)
    engine.forward(images(2, 0), [(a, 2)])
    before = snapshot(engine, a, b)
    wire.armed = True
    with pytest.raises(RuntimeError, match="tripwire"):
        engine.forward(images(5, 1, shift=1.0), [(a, 2), (b, 3)])
    assert snapshot(engine, a, b) == before


@pytest.mark.parametrize("name", NAMES)
def test_adapt_false_changes_nothing(name: str) -> None:
    engine = Engine(tiny_net(), num_classes=5)
    stream = engine.open_stream(name)
    engine.forward(images(3, 0, shift=1.0), [(stream, 3)])
    before = snapshot(engine, stream)
    x = images(4, 1, shift=1.0)
    first = engine.forward(x, [(stream, 4)], adapt=False).logits
    assert snapshot(engine, stream) == before
    torch.testing.assert_close(engine.forward(x, [(stream, 4)], adapt=False).logits, first)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_validated_with_bounds(name: str) -> None:
    adapter = get_adapter(name)
    assert adapter.config.model_json_schema()["type"] == "object"
    engine = Engine(tiny_net(), num_classes=5)
    with pytest.raises(ValidationError):
        engine.open_stream(name, {"no_such_knob": 1})


def test_bounds_are_enforced() -> None:
    engine = Engine(tiny_net(), num_classes=5)
    for name, config in [
        ("alpha_bn", {"alpha": 1.5}),
        ("unmix_tns", {"components": 0}),
        ("momentum", {"eta0": -0.1}),
        ("adabn", {"window": 0}),
    ]:
        with pytest.raises(ValidationError):
            engine.open_stream(name, config)


def test_unknown_adapter_lists_the_valid_names() -> None:
    with pytest.raises(UnknownAdapterError, match="Unknown adapter 'tent'; valid: adabn, alpha_bn"):
        get_adapter("tent")


def test_import_refuses_mismatching_states() -> None:
    engine = Engine(tiny_net(), name="tiny", num_classes=5)
    adabn, momentum = engine.open_stream("adabn"), engine.open_stream("momentum")
    unmix_16, unmix_4 = (
        engine.open_stream("unmix_tns"),
        engine.open_stream("unmix_tns", {"components": 4}),
    )
    other_model = Engine(tiny_net(channels=7), name="tiny", num_classes=5)
    cases = [
        (adabn, engine.export_stream(momentum), "adapter"),
        (unmix_4, engine.export_stream(unmix_16), "config"),
        (adabn, other_model.export_stream(other_model.open_stream("adabn")), "layers"),
        (adabn, b"not a safetensors file", "not a tta-serve stream state"),
        (adabn, b"", "not a tta-serve stream state"),
    ]
    for target, data, message in cases:
        before = engine.export_stream(target)
        with pytest.raises(StateMismatchError, match=message):
            engine.import_stream(target, data)
        assert engine.export_stream(target) == before


def test_import_refuses_non_finite_values() -> None:
    from safetensors.torch import load, save

    from adapters.state_io import METADATA_KEY, _header

    engine = Engine(tiny_net(), name="tiny", num_classes=5)
    stream = engine.open_stream("adabn")
    data = engine.export_stream(stream)
    tensors = load(data)
    tensors["layer0.mean"][0] = float("nan")
    poisoned = save(tensors, metadata={METADATA_KEY: _header(data)["__metadata__"][METADATA_KEY]})
    with pytest.raises(StateMismatchError, match="NaN or infinite"):
        engine.import_stream(stream, poisoned)
    assert engine.export_stream(stream) == data


def test_pools_grow_on_demand_and_are_freed_when_empty() -> None:
    from adapters.pool import INITIAL_SLOTS

    engine = Engine(tiny_net(), num_classes=5, capacity=16)
    first = engine.open_stream("unmix_tns", {"components": 8})
    pool = engine.pool_of(first)
    slot_bytes = pool.layout.slot_bytes
    assert pool.capacity == INITIAL_SLOTS and engine.memory.used == INITIAL_SLOTS * slot_bytes
    x = images(2, 0)
    engine.forward(x, [(first, 2)])
    before = snapshot(engine, first)
    streams = [engine.open_stream("unmix_tns", {"components": 8}) for _ in range(INITIAL_SLOTS)]
    assert pool.capacity == 2 * INITIAL_SLOTS and engine.memory.used == pool.nbytes
    assert snapshot(engine, first) == before  # the rows moved to the grown tensors intact
    for stream in [first, *streams]:
        engine.close_stream(stream)
    assert engine.pools == {} and engine.memory.used == 0
    assert engine.state_bytes() == {}


def test_the_memory_budget_bounds_every_pool() -> None:
    from adapters.pool import StateMemoryError

    probe = Engine(tiny_net(), num_classes=5)
    slot = probe.pool_of(probe.open_stream("unmix_tns", {"components": 64})).layout.slot_bytes
    engine = Engine(tiny_net(), num_classes=5, capacity=16, max_state_bytes=6 * slot)
    streams = [engine.open_stream("unmix_tns", {"components": 64}) for _ in range(6)]
    assert engine.memory.used == 6 * slot  # 4, then grown by what fits: 2
    with pytest.raises(StateMemoryError, match=r"\(max_state_bytes\) are in use"):
        engine.open_stream("unmix_tns", {"components": 64})
    with pytest.raises(StateMemoryError, match="a new unmix_tns pool needs"):
        engine.open_stream("unmix_tns", {"components": 63})
    engine.close_stream(streams[0])
    engine.open_stream("unmix_tns", {"components": 64})  # a free slot needs no memory
    assert engine.memory.used == 6 * slot


def test_pool_capacity_is_enforced() -> None:
    from adapters.pool import PoolFullError

    engine = Engine(tiny_net(), num_classes=5, capacity=2)
    first = engine.open_stream("adabn")
    engine.open_stream("adabn")
    with pytest.raises(PoolFullError, match="all 2 slots"):
        engine.open_stream("adabn")
    engine.close_stream(first)
    engine.open_stream("adabn")


def test_drift_report_moves_under_shift() -> None:
    engine = Engine(tiny_net(), num_classes=5)
    clean, shifted = engine.open_stream("source"), engine.open_stream("source")
    for seed in range(3):
        engine.forward(
            torch.cat([images(8, seed), images(8, seed, shift=3.0)]), [(clean, 8), (shifted, 8)]
        )
    a, b = engine.drift(clean), engine.drift(shifted)
    assert a["images"] == 24 and b["images"] == 24
    assert b["early"]["jeffreys"] > a["early"]["jeffreys"]
    assert len(b["layers"]["hellinger"]) == len(engine.layers)
    assert sum(b["class_frequencies"]) == pytest.approx(1.0)


def poisoned(n: int, value: float) -> torch.Tensor:
    """Finite float32 inputs so large that every statistic computed from them overflows."""
    return torch.full((n, 3, 8, 8), value) * torch.linspace(0.5, 1.0, 8)


@pytest.mark.parametrize("value", [3e38, 1e20])
@pytest.mark.parametrize("name", NAMES)
def test_a_stream_whose_state_would_break_is_refused_alone(name: str, value: float) -> None:
    """Huge inputs refuse their stream only: its state stays, the rest of the batch commits.

    What the rest commits is what it commits in the same batch without the refused stream
    (a batch of two adapters, as here: the ONNX backend's fused design serves a batch of one
    adapter as one graph, whose last bits may differ from the cut graph's).
    """
    engine = Engine(tiny_net(), num_classes=5)
    bad, good = engine.open_stream(name, seed=1), engine.open_stream(name, seed=2)
    other_adapter = "adabn" if name != "adabn" else "momentum"
    other = engine.open_stream(other_adapter)
    engine.forward(images(3, 0), [(bad, 3)])
    before = snapshot(engine, bad)
    solo = Engine(tiny_net(), num_classes=5)
    reference = solo.open_stream(name, seed=2)
    x, y = images(4, 1, shift=1.0), images(2, 2)
    result = engine.forward(
        torch.cat([x, poisoned(3, value), y]), [(good, 4), (bad, 3), (other, 2)]
    )
    refusals = result.refusals()
    assert refusals[0] is None and refusals[2] is None
    assert refusals[1] is not None
    assert refusals[1].startswith(
        "refused, the stream's state is unchanged: NaN or infinite values in the statistics of BN"
    )
    assert snapshot(engine, bad) == before
    solo_other = solo.open_stream(other_adapter)
    expected = solo.forward(torch.cat([x, y]), [(reference, 4), (solo_other, 2)]).logits
    torch.testing.assert_close(result.logits[:4], expected[:4])
    assert snapshot(engine, good) == snapshot(solo, reference)
    assert bool(torch.isfinite(result.logits[[0, 1, 2, 3, 7, 8]]).all())


def test_non_finite_logits_refuse_their_stream() -> None:
    """Finite statistics but overflowing logits: that stream's request is refused."""
    net = tiny_net()
    with torch.no_grad():
        net[-1].weight.mul_(1e35)  # ~1 activations stay finite, ~1e4 ones overflow
    engine = Engine(net, num_classes=5)
    bad, good = engine.open_stream("source"), engine.open_stream("source")
    before = snapshot(engine, bad)
    result = engine.forward(torch.cat([images(2, 0) * 1e4, images(2, 1)]), [(bad, 2), (good, 2)])
    refusals = result.refusals()
    assert refusals[1] is None and bool(torch.isfinite(result.logits[2:]).all())
    assert refusals[0] is not None and "NaN or infinite values in the logits" in refusals[0]
    assert snapshot(engine, bad) == before


def test_a_state_outside_the_adapters_bounds_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite but invalid new state (negative variance sums) is refused like a NaN one."""
    import dataclasses

    import adapters

    adabn = adapters.ADAPTERS["adabn"]

    def negative(state, moments, source, hp):
        new = adabn.update(state, moments, source, hp)
        return {**new, "m2": -new["m2"] - 1}

    monkeypatch.setitem(adapters.ADAPTERS, "adabn", dataclasses.replace(adabn, update=negative))
    engine = Engine(tiny_net(), num_classes=5)
    stream = engine.open_stream("adabn")
    before = snapshot(engine, stream)
    (reason,) = engine.forward(images(2, 0), [(stream, 2)]).refusals()
    assert reason is not None
    assert (
        "values outside the adapter's bounds (a negative count, variance or weight) in " in reason
    )
    assert "the statistics of BN layer 0 of 4 (1) after this batch" in reason
    assert snapshot(engine, stream) == before


def test_import_bounds_the_header_and_checks_the_metadata_first() -> None:
    import json

    from safetensors.torch import load, save

    from adapters.state_io import METADATA_KEY, _header

    engine = Engine(tiny_net(), name="tiny", num_classes=5)
    stream = engine.open_stream("adabn")
    data = engine.export_stream(stream)
    metadata = json.loads(_header(data)["__metadata__"][METADATA_KEY])
    expected = len(load(data))

    def with_metadata(tensors: dict, **changes: object) -> bytes:
        return save(tensors, metadata={METADATA_KEY: json.dumps({**metadata, **changes})})

    many = {f"t{i}": torch.zeros(1) for i in range(expected + 1)}
    huge = {f"t{i}": torch.zeros(1) for i in range(20_000)}
    cases = [
        (with_metadata(huge), "the state's header is "),
        (
            with_metadata(many),
            f"holds {expected + 1} tensors, a state of this stream has {expected}",
        ),
        (with_metadata(many, adapter="momentum"), "state is for adapter='momentum'"),
        (with_metadata(load(data), seed=True), "no valid seed"),
        (with_metadata(load(data), seed=2**64), "no valid seed"),
        (with_metadata(load(data), seed=-1), "no valid seed"),
    ]
    for payload, message in cases:
        with pytest.raises(StateMismatchError, match=message):
            engine.import_stream(stream, payload)
        assert engine.export_stream(stream) == data
    engine.import_stream(stream, with_metadata(load(data), seed=2**63 - 1))
