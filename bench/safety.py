"""Auto-reset on the accuracy benchmark's continual and label-correlated protocols.

Every adapter runs each protocol twice on the same streams, without and with an auto-reset policy
(by default the server's recommended preset, ``service.safety.RECOMMENDED``), checked after every
batch exactly as the server checks it. The error % (mean over the corruptions) of both, their
difference and the number of auto-resets go into a marked section of docs/safety.md.

    uv run python -m bench.safety --n 200 --dirichlet-n 400 --dirichlet-corruptions 5 \
        --adapters adabn     # ~20 min on 2 busy CPU cores (docs/safety.md)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch

from bench.accuracy import (
    VARIANTS,
    Pool,
    Variant,
    build_protocol,
    error_rates,
    load_pool,
    run_protocol,
)
from bench.corruptions import CORRUPTIONS
from bench.report import command_line, fmt, machine, table, write_section
from engine.core import Engine
from models import Normalizer, create_model
from service.safety import RECOMMENDED, AutoResetPolicy

log = logging.getLogger(__name__)

ADAPTERS = ("adabn", "tbn", "alpha_bn", "unmix_tns", "momentum")
PROTOCOLS = ("continual", "dirichlet")


def rows_for(
    engine: Engine,
    normalizer: Normalizer,
    pool: Pool,
    protocol_name: str,
    args: argparse.Namespace,
    policies: dict[str, AutoResetPolicy],
) -> list[list[str]]:
    """One row per adapter and policy: error without and with it, the change, the resets."""
    protocol = build_protocol(protocol_name, pool.domains, pool.labels, args.seed, args.batch)
    plain = [VARIANTS[label] for label in args.adapters]
    guarded = [
        (off, Variant(f"{off.label}+{name}", off.adapter, off.config, auto_reset=policy))
        for off in plain
        for name, policy in policies.items()
    ]
    resets: dict[str, int] = {}
    variants = [*plain, *(on for _, on in guarded)]
    predictions = run_protocol(
        engine, normalizer, pool, protocol, variants, args.max_batch, protocol_name, resets
    )

    def mean_error(label: str) -> float:
        errors = error_rates(predictions[label], pool.labels, pool.domains, len(pool.names))
        return float(np.nanmean(errors))

    rows = []
    for off, on in guarded:
        before, after = mean_error(off.label), mean_error(on.label)
        rows.append(
            [
                protocol_name,
                off.label,
                on.label.split("+", 1)[1],
                fmt(before, 2),
                fmt(after, 2),
                f"{after - before:+.2f}",
                str(resets.get(on.label, 0)),
            ]
        )
    return rows


def parse_policies(items: list[str]) -> dict[str, AutoResetPolicy]:
    """``NAME=JSON`` policies by name (none: the recommended preset)."""
    if not items:
        return {"recommended": RECOMMENDED}
    policies = {}
    for item in items:
        name, _, text = item.partition("=")
        policies[name] = AutoResetPolicy.model_validate_json(text)
    return policies


def main() -> None:
    """Run the protocols and write the section."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar10_resnet20")
    p.add_argument("--n", type=int, default=200, help="images per corruption (continual)")
    p.add_argument("--dirichlet-n", type=int, default=400, help="images per corruption (dirichlet)")
    p.add_argument("--dirichlet-corruptions", type=int, default=0, help="the first N only (0: all)")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--adapters",
        nargs="+",
        choices=list(VARIANTS),
        default=list(ADAPTERS),
        metavar="LABEL",
        help="variants by label, e.g. 'balanced(window=1000.0, window_min=100.0, d0=0.02)'",
    )
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an auto-reset policy to measure (repeatable; default: the recommended preset)",
    )
    p.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), default=list(CORRUPTIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("docs/safety.md"))
    p.add_argument("--section", default="auto-reset")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar10"))
    p.add_argument("--data-cache", type=Path, default=Path(".cache/data"))
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    policies = parse_policies(args.policy)
    model, spec = create_model(args.model, cache_dir=args.cache_dir)
    engine = Engine(model, name=args.model, num_classes=10, device=device, capacity=1024)
    normalizer = Normalizer(spec)
    rows = []
    corruptions = args.corruptions
    for name in args.protocols:
        n = args.n
        if name == "dirichlet":
            n = args.dirichlet_n
            args.corruptions = corruptions[: args.dirichlet_corruptions or None]
        pool = load_pool(args, args.severity, device, n)
        args.corruptions = corruptions
        rows += rows_for(engine, normalizer, pool, name, args, policies)
        log.info("%s done", name)
    body = "\n".join(
        [
            f"Machine: {machine(device)}. Command: `{command_line()}`.",
            "",
            f"Model {args.model}, severity {args.severity}, B = {args.batch}; continual: "
            f"{args.n} images per corruption; label-correlated (Dirichlet): {args.dirichlet_n} "
            "per corruption. Error % is the mean over the corruptions. Policies:",
            "",
            *(f"- {name}: `{policy.model_dump_json()}`" for name, policy in policies.items()),
            "",
            table(
                [
                    "protocol",
                    "adapter",
                    "policy",
                    "error % off",
                    "error % with",
                    "change",
                    "resets",
                ],
                rows,
            ),
        ]
    )
    write_section(args.out, args.section, body, title="Stream safety and feedback")
    print(body)


if __name__ == "__main__":
    main()
