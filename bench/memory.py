"""State memory per stream: bytes of one slot of each adapter's pool, per model.

    uv run python -m bench.memory [--models cifar10_resnet20 cifar10_resnet32]

A slot holds the adapter's state, the drift observer's and the prediction observer's, and the
stream's hyperparameters, for every BN layer (``StateLayout.slot_bytes``). UnMix-TNS grows with
its number of components K. The pool of a configuration grows on demand up to
``slots_per_pool`` slots, and the total per model is bounded by ``max_state_bytes``: the table
says how many streams of each kind that bound holds. Counted, not timed: the numbers do not
depend on the machine. Writes a section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from adapters import ADAPTERS
from bench.report import command_line, machine, table, write_section
from engine.core import Engine
from models import get_spec
from models.registry import build_architecture
from service.settings import Settings

log = logging.getLogger(__name__)

COMPONENTS = (1, 16, 128, 512)
MIB = 1 << 20


def slot_bytes(engine: Engine, adapter: str, config: dict) -> int:
    """Bytes of one stream's slot of this adapter and config."""
    return engine.pool_of(engine.open_stream(adapter, config)).layout.slot_bytes


def rows(model: str) -> list[tuple[str, int]]:
    """(configuration, bytes per stream) of every adapter (UnMix-TNS for each K) of ``model``."""
    spec = get_spec(model)
    engine = Engine(build_architecture(spec).eval(), name=model, num_classes=spec.num_classes)
    found = []
    for name in sorted(ADAPTERS):
        if name == "unmix_tns":
            for k in COMPONENTS:
                found.append((f"unmix_tns, K = {k}", slot_bytes(engine, name, {"components": k})))
        else:
            found.append((name, slot_bytes(engine, name, {})))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_resnet20", "cifar10_resnet32"])
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    defaults = Settings()
    per_pool, limit = defaults.slots_per_pool, defaults.max_state_bytes
    header = [
        "model",
        "adapter",
        "bytes per stream",
        f"full pool ({per_pool} slots), MiB",
        f"streams in max_state_bytes = {limit // MIB} MiB",
    ]
    body = []
    for model in args.models:
        for config, size in rows(model):
            full = size * per_pool / MIB
            body.append((model, config, f"{size:,}", f"{full:.1f}", f"{limit // size:,}"))
    lines = [
        "## State memory per stream",
        "",
        f"`{command_line()}` (counted, not timed; written on {machine()}). Defaults: "
        f"`slots_per_pool={per_pool}`, `max_state_bytes={limit}`. A pool starts with 4 slots and "
        "doubles as streams arrive, so a configuration costs about its streams' bytes; a pool "
        "that is empty is freed. At the bound, a pool evicts its least recently used stream to "
        "the store rather than grow, and a configuration whose first slot does not fit is "
        "refused (507 `state_memory_exhausted`).",
        "",
        table(header, body),
    ]
    write_section(args.out, "bench.memory", "\n".join(lines), title="Performance")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
