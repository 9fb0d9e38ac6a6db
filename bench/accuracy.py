"""Accuracy under shift: every adapter on a generated CIFAR-10-C, under the field's protocols.

ALGORITHMS.md sections 8, 9 and 11. For each model, at one severity, every adapter (with its paper
defaults, plus a few named variants) is run through these streams of corrupted test images:

- ``iid``: i.i.d. (shuffled) images, a fresh stream per corruption, batches of 64 and of 200;
- ``continual``: the 15 corruptions one after the other on one stream, never reset, B = 64;
- ``mixed``: one shuffled stream over all corruptions, B = 64;
- ``dirichlet``: label-correlated, per corruption (fresh stream) ordered by TTA-LIB's
  ``sort_by_dirichlet`` (NOTE) with delta = 0.1, B = 64;
- ``single``: single images (N = 1), shuffled, a fresh stream per corruption.

Plus the source error on clean images and a severity sweep (i.i.d., B = 64) for one model. Error %
per corruption and their mean go into a marked section of a markdown report with PNG plots; the
issue's targets and the papers' orderings are checked; candidate default configurations are
scored by their worst gap to source over all protocols. ``--server URL`` replays the same
streams through a running tta-serve and counts the predictions that differ from the offline ones.

Independent streams run as "lanes" of one engine forward (one segment per stream): the engine
normalises every stream with its own segment's statistics, so this gives each stream exactly what
it would get alone, at a fraction of the Python overhead (which dominates at N = 1).

    uv run python -m bench.accuracy --models cifar10_resnet20 --n 200 --dirichlet-n 500 \
        --single-n 60 --sweep-n 100 --device cpu              # reduced, ~15 min on 2 cores
    uv run python -m bench.accuracy --n 10000 --single-n 2000 --device cuda   # full, on a GPU
    uv run python -m bench.accuracy --n 128 --server http://127.0.0.1:8000 --section server
    uv run python -m bench.accuracy --models cifar10_resnet20 --full --resume   # in pieces

Every result is stored as it finishes in ``--cells`` (bench/results/accuracy-cells.json, per
model, protocol, variant and corruption); with ``--resume`` a stopped run continues where it
stopped, and ``--corruptions`` runs the per-corruption protocols a few corruptions at a time.
``--engine-mode compiled`` runs the engine's compiled forward (one compilation per layout, then
2-5x faster on the CPU): worth it where thousands of forwards share a layout (continual, mixed,
N = 1), not for the 157 forwards of a per-corruption protocol.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adapters import get_adapter
from bench.corruptions import CORRUPTIONS
from bench.data import load_cifar10, load_cifar10c
from bench.report import command_line, fmt, machine, table, write_section
from engine.core import Engine, StreamHandle
from models import Normalizer, create_model
from service.safety import AutoResetPolicy, Watch, check

log = logging.getLogger(__name__)

NUM_CLASSES = 10
DIRICHLET_DELTA = 0.1  # UnMix-TNS / TTA-LIB for CIFAR10-C (ALGORITHMS.md 5.5, 8)
PROTOCOLS = ("iid", "continual", "mixed", "dirichlet", "single")


# ------------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Variant:
    """An adapter with one configuration, under a display label."""

    label: str
    adapter: str
    config: tuple[tuple[str, object], ...] = ()
    auto_reset: AutoResetPolicy | None = None  # the server's auto-reset check after each batch

    @property
    def config_dict(self) -> dict:
        """The config as the engine and the API take it."""
        return dict(self.config)


def variant(adapter: str, label: str | None = None, **config: object) -> Variant:
    """A named configuration; the label defaults to ``adapter(key=value, ...)``."""
    if label is None:
        args = ", ".join(f"{k}={v}" for k, v in config.items())
        label = f"{adapter}({args})" if args else adapter
    return Variant(label, adapter, tuple(config.items()))


# Every adapter with its papers' defaults, plus the one variant a paper uses in one setting:
# UnMix-TNS raises K to 128 for mixed domains (ALGORITHMS.md 5.5); and UnMix-TNS with its
# components started at the source (alpha_init = 0, an extension): its random initial spread
# is what costs it most on short streams (docs/accuracy.md, findings).
MAIN_VARIANTS = (
    variant("source"),
    variant("tbn"),
    variant("adabn"),
    variant("alpha_bn"),
    variant("unmix_tns"),
    variant("unmix_tns", components=128),
    variant("unmix_tns", alpha_init=0.0),
    variant("momentum"),
    variant("balanced"),
    variant("gated"),
)

# Candidates for a server default that is never worse than source (section "A default ..."):
# AdaBN with a source prior of n0 images (Schneider et al.), optionally windowed (an EMA, for
# continual streams); the momentum method with its schedule in batches of 64 images; class-
# balanced statistics with longer or gated class memories (the gated one is the server's
# default), and the gated one with a pooled prior for young streams (the preset short_streams).
CANDIDATES = (
    variant("adabn", prior_images=16),
    variant("adabn", prior_images=64),
    variant("adabn", prior_images=64, window=512),
    variant("momentum", batch_ref=64),
    variant("balanced", window=1000.0),
    variant("balanced", window=4000.0),
    variant("balanced", window=1000.0, window_min=100.0, d0=0.02),
    variant("balanced", window=1000.0, window_min=100.0, d0=0.02, pooled_prior_images=64.0),
)

# Every variant the benchmarks know, by label: what --variants (and bench.safety's --adapters) take.
VARIANTS = {v.label: v for v in (*MAIN_VARIANTS, *CANDIDATES)}


# ------------------------------------------------------------------------------------ orderings


def dirichlet_order(
    labels: np.ndarray,
    delta: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
    min_size: int = 10,
    max_tries: int = 10_000,
) -> np.ndarray:
    """A label-correlated permutation of ``range(len(labels))``: TTA-LIB's ``sort_by_dirichlet``.

    TTA-LIB (classification/datasets/data_loading.py, adapted from NOTE), with a seeded generator
    instead of NumPy's global state: there are as many chunks as classes; each class's shuffled
    indices are split over the chunks with Dirichlet(delta) proportions (chunks already holding
    more than N / chunks samples get none), redrawn until every chunk holds >= ``min_size``
    (lowered to N / (4 chunks) for small N, where 10 may be unreachable); then
    chunk by chunk the classes are emitted in a random order as contiguous blocks. Small delta
    gives long single-class runs.
    """
    labels = np.asarray(labels)
    n = len(labels)
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    chunks = classes
    # TTA-LIB's 10 assumes thousands of samples; small test sets need a smaller floor to exist
    min_size = min(min_size, n // (4 * chunks))
    for _ in range(max_tries):
        members: list[list[int]] = [[] for _ in range(chunks)]
        per_class: list[list[np.ndarray]] = [[] for _ in range(chunks)]
        for k in range(classes):
            idx = np.flatnonzero(labels == k)
            rng.shuffle(idx)
            p = rng.dirichlet(np.repeat(delta, chunks))
            # balance: a chunk that is already full takes no more samples
            p = np.array([q * (len(m) < n / chunks) for q, m in zip(p, members, strict=True)])
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for j, part in enumerate(np.split(idx, cuts)):
                members[j].extend(part.tolist())
                per_class[j].append(part)
        if min(len(m) for m in members) >= min_size:
            break
    else:
        raise ValueError(f"no Dirichlet({delta}) ordering with chunks of >= {min_size} samples")
    order = []
    for chunk in per_class:
        for k in rng.permutation(classes):
            order.extend(chunk[k].tolist())
    return np.asarray(order, dtype=np.int64)


def cut(order: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive batches of ``size`` (the last one may be shorter), as a DataLoader cuts."""
    return [order[i : i + size] for i in range(0, len(order), size)]


def longest_runs(labels: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of equal consecutive labels (a label-correlation measure)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(np.diff(labels) != 0) + 1
    bounds = np.concatenate([[0], edges, [len(labels)]])
    return np.diff(bounds)


# ------------------------------------------------------------------------------------ protocols


@dataclass
class Protocol:
    """Streams of batches of row indices into a data pool; each stream starts fresh."""

    key: str
    title: str
    batch: int
    streams: list[list[np.ndarray]]
    seeds: list[int]

    @property
    def images(self) -> int:
        """Images fed to each variant."""
        return sum(len(b) for s in self.streams for b in s)

    @property
    def forwards(self) -> int:
        """Calls per stream lane, the longest stream's batch count."""
        return max(len(s) for s in self.streams)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for (seed, protocol, stream): orderings do not share draws."""
    return np.random.default_rng([seed, *keys])


def build_protocol(
    name: str,
    domains: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch: int = 64,
    single_n: int | None = None,
    delta: float = DIRICHLET_DELTA,
    keys: Sequence[int] | None = None,
) -> Protocol:
    """The streams of one protocol over a pool whose row i has corruption ``domains[i]``.

    ``name`` is one of iid, continual, mixed, dirichlet, single; ``single_n`` caps the images per
    corruption of the single-image protocol (N = 1 is slow: one call per image). ``keys`` name
    each domain for the seeding (default its index): with the corruption's index in the full
    list, a run over a few corruptions gives each per-corruption stream exactly the images and
    order it has in the run over all of them.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    tag = PROTOCOLS.index(name) * 1000 + batch
    per_domain = [np.flatnonzero(domains == d) for d in np.unique(domains)]
    keys = list(range(len(per_domain))) if keys is None else list(keys)

    def shuffled(d: int, rows: np.ndarray) -> np.ndarray:
        return rows[_rng(seed, tag, keys[d]).permutation(len(rows))]

    if name == "iid":
        streams = [cut(shuffled(d, rows), batch) for d, rows in enumerate(per_domain)]
        title = f"i.i.d., B={batch}, reset per corruption"
    elif name == "continual":
        # TTA-LIB loads each domain on its own: batches never straddle a domain change
        streams = [[b for d, rows in enumerate(per_domain) for b in cut(shuffled(d, rows), batch)]]
        title = f"continual (corruptions in sequence, no reset), B={batch}"
    elif name == "mixed":
        rows = np.concatenate(per_domain)
        streams = [cut(rows[_rng(seed, tag).permutation(len(rows))], batch)]
        title = f"mixed domains (one shuffled stream), B={batch}"
    elif name == "dirichlet":
        streams = [
            cut(
                rows[dirichlet_order(labels[rows], delta, _rng(seed, tag, keys[d]), NUM_CLASSES)],
                batch,
            )
            for d, rows in enumerate(per_domain)
        ]
        title = f"label-correlated, Dirichlet(delta={delta}), B={batch}, reset per corruption"
    else:  # single
        streams = [cut(shuffled(d, rows)[:single_n], 1) for d, rows in enumerate(per_domain)]
        batch = 1
        title = "single images (N=1), i.i.d. order, reset per corruption"
    # one seed per stream (UnMix-TNS's random components), shared by the variants
    seeds = [
        seed * 100_000 + tag * 100 + (keys[i] if len(streams) == len(keys) else i)
        for i in range(len(streams))
    ]
    key = f"{name}{batch}" if name == "iid" else name
    return Protocol(key, title, batch, streams, seeds)


# ----------------------------------------------------------------------------------- execution


@dataclass
class Pool:
    """Images of all corruptions of one setting, on the device, with labels and domains."""

    images: torch.Tensor  # uint8 [M, 3, H, W] on the engine's device
    labels: np.ndarray  # int64 [M]
    domains: np.ndarray  # int64 [M], index into ``names``
    names: tuple[str, ...]


def stream_config(v: Variant, seed: int) -> dict:
    """The variant's config, with the stream's seed where the adapter takes one (UnMix-TNS).

    Putting the seed in the config lets a server stream (whose API takes no seed) start from the
    same random components as the offline one.
    """
    config = v.config_dict
    if "seed" in get_adapter(v.adapter).config.model_fields:
        config.setdefault("seed", seed)
    return config


def run_protocol(
    engine: Engine,
    normalizer: Normalizer,
    pool: Pool,
    protocol: Protocol,
    variants: Sequence[Variant],
    max_batch: int,
    desc: str = "",
    resets: dict[str, int] | None = None,
    todo: set[tuple[str, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Predicted class per pool row for every variant (-1 where the protocol shows no image).

    Every (variant, stream) pair is a lane: lanes are packed into forwards of at most
    ``max_batch`` images, one engine segment per lane, and advance one batch per forward.
    A variant with an auto-reset policy is checked after each batch; ``resets`` (if given)
    receives its number of auto-resets by label. ``todo`` (variant label, stream index) keeps
    only those lanes (a resumed run).
    """
    lanes = [
        (v, s)
        for v in variants
        for s in range(len(protocol.streams))
        if todo is None or (v.label, s) in todo
    ]
    predictions = {v.label: np.full(len(pool.labels), -1, dtype=np.int64) for v in variants}
    per_forward = max(1, max_batch // protocol.batch)
    groups = [lanes[i : i + per_forward] for i in range(0, len(lanes), per_forward)]
    total = sum(max(len(protocol.streams[s]) for _, s in g) for g in groups)
    with tqdm(total=total, desc=desc, unit="fwd", leave=False) as bar:
        for group in groups:
            handles = [
                engine.open_stream(
                    v.adapter, stream_config(v, protocol.seeds[s]), protocol.seeds[s]
                )
                for v, s in group
            ]
            watches = [Watch() for _ in group]
            try:
                for step in range(max(len(protocol.streams[s]) for _, s in group)):
                    active = [
                        (i, protocol.streams[s][step])
                        for i, (_, s) in enumerate(group)
                        if step < len(protocol.streams[s])
                    ]
                    rows = np.concatenate([b for _, b in active])
                    x = normalizer(pool.images[torch.from_numpy(rows).to(pool.images.device)])
                    segments = [(handles[i], len(b)) for i, b in active]
                    labels = engine.forward(x, segments).logits.argmax(1).cpu().numpy()
                    auto_reset(engine, [(group[i][0], handles[i], watches[i]) for i, _ in active])
                    start = 0
                    for i, b in active:
                        predictions[group[i][0].label][b] = labels[start : start + len(b)]
                        start += len(b)
                    bar.update()
            finally:
                for handle in handles:
                    engine.close_stream(handle)
                for (v, _), watch in zip(group, watches, strict=True):
                    if resets is not None and v.auto_reset is not None:
                        resets[v.label] = resets.get(v.label, 0) + watch.resets
    return predictions


def auto_reset(engine: Engine, lanes: Sequence[tuple[Variant, StreamHandle, Watch]]) -> None:
    """Reset the lanes whose variant's auto-reset policy fires after this batch (as the server)."""
    checked = [(v.auto_reset, h, w) for v, h, w in lanes if v.auto_reset is not None]
    if not checked:
        return
    summaries = engine.drift_summaries([handle for _, handle, _ in checked])
    for (policy, handle, watch), summary in zip(checked, summaries, strict=True):
        if policy is not None and check(policy, summary, watch) is not None:
            engine.reset_stream(handle)
            watch.resets += 1
            watch.baseline = None


def error_rates(
    predictions: np.ndarray, labels: np.ndarray, domains: np.ndarray, n_domains: int
) -> np.ndarray:
    """Error % per domain over the rows that were predicted (NaN for a domain with none)."""
    shown = predictions >= 0
    wrong = np.bincount(
        domains[shown], weights=predictions[shown] != labels[shown], minlength=n_domains
    )
    count = np.bincount(domains[shown], minlength=n_domains)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, 100.0 * wrong / np.maximum(count, 1), np.nan)


# ---------------------------------------------------------------------------------------- cache


class ResultCache:
    """Error % per (model, protocol, variant, corruption) on disk, so a stopped run resumes.

    One JSON file: ``{setting: {"title", "per_domain", "majority", "errors": {label:
    {corruption: error %}}}}``, where a setting names the model, severity, seed, images per
    corruption and protocol (``cifar10_resnet20|sev5|seed0|n10000|iid64``): results of another
    size never mix. Written after every finished piece (atomically: a stop mid-write keeps the
    previous file). Without a path it keeps nothing (plain, non-resumable runs).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, dict] = {}
        if path is not None and path.exists():
            self.data = json.loads(path.read_text())

    @staticmethod
    def setting(model: str, args: argparse.Namespace, per_domain: int, key: str) -> str:
        """The key of one protocol's results at one size.

        A continual or mixed stream over some of the corruptions is another experiment than
        over all of them: its key names them. Per-corruption streams do not depend on the others.
        """
        subset = ""
        if key in ("continual", "mixed") and list(args.corruptions) != list(CORRUPTIONS):
            subset = "|" + "+".join(args.corruptions)
        return f"{model}|sev{args.severity}|seed{args.seed}|n{per_domain}|{key}{subset}"

    def errors(self, setting: str, label: str) -> dict[str, float]:
        """The cached error % per corruption of one variant (empty if none)."""
        return self.data.get(setting, {}).get("errors", {}).get(label, {})

    def store(
        self,
        setting: str,
        title: str,
        per_domain: int,
        majority: float,
        label: str,
        errors: dict[str, float],
    ) -> None:
        """Add one variant's errors per corruption and write the file."""
        if self.path is None:
            self._add(self.data, setting, title, per_domain, majority, label, errors)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Runs in parallel (pieces of one matrix) share the file: under a lock, re-read it and
        # add this result, so that no run drops what another stored since it started.
        with self.path.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.data = json.loads(self.path.read_text())
            self._add(self.data, setting, title, per_domain, majority, label, errors)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
            temporary.replace(self.path)

    @staticmethod
    def _add(
        data: dict[str, dict],
        setting: str,
        title: str,
        per_domain: int,
        majority: float,
        label: str,
        errors: dict[str, float],
    ) -> None:
        entry = data.setdefault(setting, {"errors": {}})
        entry.update(title=title, per_domain=per_domain, majority=majority)
        entry["errors"].setdefault(label, {}).update(errors)


# --------------------------------------------------------------------------------------- server


def run_protocol_server(
    client, model: str, pool: Pool, protocol: Protocol, variants: Sequence[Variant], desc: str = ""
) -> dict[str, np.ndarray]:
    """:func:`run_protocol` through a running tta-serve: one HTTP stream per lane.

    Each stream is created with the variant's adapter and config (UnMix-TNS's seed included),
    fed the protocol's batches as raw uint8 tensors in order, and deleted.
    """
    predictions = {v.label: np.full(len(pool.labels), -1, dtype=np.int64) for v in variants}
    images = pool.images.cpu()
    total = len(variants) * sum(len(s) for s in protocol.streams)
    with tqdm(total=total, desc=desc, unit="req", leave=False) as bar:
        for v in variants:
            for s, batches in enumerate(protocol.streams):
                body = {
                    "model": model,
                    "adapter": v.adapter,
                    "preset": "paper",  # the variant's config over the paper's defaults
                    "config": stream_config(v, protocol.seeds[s]),
                }
                response = client.post("/v1/streams", json=body)
                response.raise_for_status()
                stream_id = response.json()["id"]
                try:
                    for rows in batches:
                        batch = images[torch.from_numpy(rows)].contiguous()
                        response = client.post(
                            f"/v1/streams/{stream_id}/predict",
                            params={
                                "shape": ",".join(map(str, batch.shape)),
                                "dtype": "uint8",
                                "top_k": 1,
                            },
                            content=batch.numpy().tobytes(),
                            headers={"content-type": "application/octet-stream"},
                        )
                        response.raise_for_status()
                        labels = [p["index"] for p in response.json()["predictions"]]
                        predictions[v.label][rows] = labels
                        bar.update()
                finally:
                    client.delete(f"/v1/streams/{stream_id}")
    return predictions


# ---------------------------------------------------------------------------------- the run


@dataclass
class Table:
    """Error % per corruption of every variant under one protocol."""

    title: str
    per_domain: int  # images per corruption each variant saw
    errors: dict[str, np.ndarray]  # label -> [15]
    majority: float = math.nan  # mean share of a batch's most frequent class

    def mean(self, label: str) -> float:
        """Mean error over the corruptions (NaN for a variant this run did not measure)."""
        if label not in self.errors:
            return math.nan
        return float(np.nanmean(self.errors[label]))

    def complete_mean(self, label: str) -> float:
        """Mean error over the corruptions, NaN unless every one of them was measured."""
        if label not in self.errors or np.isnan(self.errors[label]).any():
            return math.nan
        return float(np.mean(self.errors[label]))


@dataclass
class ModelResults:
    """Everything measured for one model."""

    clean: dict[str, float] = field(default_factory=dict)  # label -> error %, i.i.d. B=64
    tables: dict[str, Table] = field(default_factory=dict)  # protocol key -> table
    sweep: dict[int, Table] = field(default_factory=dict)  # severity -> i.i.d. B=64 table
    mismatches: dict[str, dict[str, int]] = field(default_factory=dict)  # server check
    compared: dict[str, int] = field(default_factory=dict)  # predictions compared per variant
    seconds: float = 0.0  # wall time of the model's runs
    command: str = ""  # the command line that measured them
    machine: str = ""


def to_device_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] (the data sets' layout) as uint8 [N, 3, H, W] on ``device``."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)


def load_pool(
    args: argparse.Namespace, severity: int, device: torch.device, n: int | None = None
) -> Pool:
    """The first ``n`` (default ``args.n``) images of every corruption at ``severity``."""
    images, labels, domains = [], [], []
    for d, name in enumerate(args.corruptions):
        x, y = load_cifar10c(name, severity, args.data_dir, args.data_cache, n=n or args.n)
        images.append(x)
        labels.append(y)
        domains.append(np.full(len(y), d, dtype=np.int64))
    return Pool(
        to_device_images(np.concatenate(images), device),
        np.concatenate(labels),
        np.concatenate(domains),
        tuple(args.corruptions),
    )


def protocol_list(
    args: argparse.Namespace, pool: Pool, dirichlet_pool: Pool
) -> list[tuple[Protocol, Pool]]:
    """The requested protocols with their pools (``iid`` once per batch size)."""
    out = []
    for name in args.protocols:
        data = dirichlet_pool if name == "dirichlet" else pool
        sizes = args.iid_batches if name == "iid" else [args.batch]
        for size in sizes:
            keys = [list(CORRUPTIONS).index(c) for c in data.names]
            protocol = build_protocol(
                name, data.domains, data.labels, args.seed, size, args.single_n, keys=keys
            )
            out.append((protocol, data))
    return out


def majority_share(protocol: Protocol, labels: np.ndarray) -> float:
    """Mean share of the most frequent class in a batch: 1.0 = single-class batches."""
    shares = [
        np.bincount(labels[b], minlength=NUM_CLASSES).max() / len(b)
        for stream in protocol.streams
        for b in stream
    ]
    return float(np.mean(shares))


def measure(
    engine: Engine,
    normalizer: Normalizer,
    pool: Pool,
    protocol: Protocol,
    variants: Sequence[Variant],
    args: argparse.Namespace,
    desc: str,
    cache: ResultCache | None = None,
    setting: str = "",
) -> Table:
    """Run one protocol for all variants (only what ``cache`` lacks, with ``args.resume``).

    Variants run a few at a time (their lanes packed into shared forwards), and each finished
    variant's errors are stored in the cache at once: a stopped run loses at most one piece.
    """
    cache = cache if cache is not None else ResultCache(None)
    names = pool.names
    domains = [set(np.unique(pool.domains[np.concatenate(s)]).tolist()) for s in protocol.streams]
    per_domain = protocol.images // len(names)
    majority = majority_share(protocol, pool.labels)

    def missing(v: Variant) -> set[int]:
        cached = cache.errors(setting, v.label) if args.resume else {}
        return {s for s, ds in enumerate(domains) if any(names[d] not in cached for d in ds)}

    pending = [(v, missing(v)) for v in variants]
    pending = [(v, m) for v, m in pending if m and not args.cached_only]
    lanes_per_forward = max(1, args.max_batch // protocol.batch)
    chunk = max(1, min(args.variants_per_piece, lanes_per_forward // len(protocol.streams)))
    for start in range(0, len(pending), chunk):
        piece = pending[start : start + chunk]
        todo = {(v.label, s) for v, streams in piece for s in streams}
        predictions = run_protocol(
            engine,
            normalizer,
            pool,
            protocol,
            [v for v, _ in piece],
            args.max_batch,
            desc,
            todo=todo,
        )
        for v, _ in piece:
            rates = error_rates(predictions[v.label], pool.labels, pool.domains, len(names))
            shown = {names[d]: float(r) for d, r in enumerate(rates) if not math.isnan(r)}
            cache.store(setting, protocol.title, per_domain, majority, v.label, shown)
            log.info("%s %s: %.1f", desc, v.label, float(np.mean(list(shown.values()))))
    errors = {}
    for v in variants:
        cached = cache.errors(setting, v.label)
        errors[v.label] = np.array([cached.get(name, math.nan) for name in names], dtype=float)
    return Table(protocol.title, per_domain, errors, majority)


def measure_clean(
    name: str,
    engine: Engine,
    normalizer: Normalizer,
    variants: Sequence[Variant],
    args: argparse.Namespace,
    device: torch.device,
    cache: ResultCache,
) -> dict[str, float]:
    """Error % of the main variants on the first ``args.n`` clean test images, i.i.d."""
    clean_x, clean_y = load_cifar10("test", args.data_dir, args.data_cache)
    clean = Pool(
        to_device_images(clean_x[: args.n], device),
        clean_y[: args.n],
        np.zeros(len(clean_y[: args.n]), dtype=np.int64),
        ("clean",),
    )
    protocol = build_protocol("iid", clean.domains, clean.labels, args.seed, args.batch)
    main_variants = [v for v in variants if v in MAIN_VARIANTS]
    setting = ResultCache.setting(name, args, len(clean.labels), "clean")
    table_ = measure(
        engine, normalizer, clean, protocol, main_variants, args, f"{name} clean", cache, setting
    )
    return {label: float(e[0]) for label, e in table_.errors.items()}


def run_model(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    variants: Sequence[Variant],
    checkpoint: Callable[[ModelResults], None] | None = None,
) -> ModelResults:
    """All protocols (and the clean and sweep runs where asked) for one model.

    ``checkpoint`` is called with the results so far after every protocol, so a run that is
    stopped (a time limit) keeps what it measured.
    """
    started = time.perf_counter()
    results = ModelResults(command=command_line(), machine=machine(device))
    cache = ResultCache(args.cells)
    model, spec = create_model(name, cache_dir=args.cache_dir)
    engine = Engine(
        model,
        name=name,
        num_classes=NUM_CLASSES,
        device=device,
        capacity=1024,
        mode=args.engine_mode,
    )
    normalizer = Normalizer(spec)

    if not args.skip_clean:
        results.clean = measure_clean(name, engine, normalizer, variants, args, device, cache)

    pool = load_pool(args, args.severity, device)
    # The label correlation of sort_by_dirichlet grows with the stream's length (10 chunks
    # whatever N): a reduced run can give this protocol more images to keep its runs long.
    dirichlet_pool = pool
    if "dirichlet" in args.protocols and args.dirichlet_n not in (None, args.n):
        dirichlet_pool = load_pool(args, args.severity, device, args.dirichlet_n)
    client = None
    if args.server:
        import httpx  # only the server check needs it

        client = httpx.Client(base_url=args.server, timeout=300.0)
    try:
        for protocol, data in protocol_list(args, pool, dirichlet_pool):
            desc = f"{name} {protocol.key}"
            per_domain = protocol.images // len(data.names)
            setting = ResultCache.setting(name, args, per_domain, protocol.key)
            table_ = measure(
                engine, normalizer, data, protocol, variants, args, desc, cache, setting
            )
            results.tables[protocol.key] = table_
            log.info("%s: %s", desc, {k: round(table_.mean(k), 1) for k in table_.errors})
            results.seconds = time.perf_counter() - started
            if checkpoint is not None:
                checkpoint(results)
            if client is not None:
                checked = [v for v in variants if v.label in args.server_variants] or variants
                offline = run_protocol(
                    engine, normalizer, data, protocol, checked, args.max_batch, desc
                )
                served = run_protocol_server(client, name, data, protocol, checked, desc + " http")
                results.mismatches[protocol.key] = {
                    v.label: int((served[v.label] != offline[v.label]).sum()) for v in checked
                }
                results.compared[protocol.key] = protocol.images
    finally:
        if client is not None:
            client.close()

    if name == args.sweep_model:
        same_n = args.sweep_n in (None, args.n)
        # the main severity is measured already, unless the sweep uses another n
        sweep = [s for s in args.sweep if s != args.severity or not same_n]
        for severity in sweep:
            pool = load_pool(args, severity, device, args.sweep_n)
            protocol = build_protocol("iid", pool.domains, pool.labels, args.seed, args.batch)
            desc = f"{name} severity {severity}"
            results.sweep[severity] = measure(
                engine,
                normalizer,
                pool,
                protocol,
                [v for v in variants if v in MAIN_VARIANTS],
                args,
                desc,
            )
        key = f"iid{args.batch}"
        if key in results.tables and args.severity in args.sweep and same_n:
            results.sweep[args.severity] = results.tables[key]
    results.seconds = time.perf_counter() - started
    return results


# ------------------------------------------------------------------------------- the findings


@dataclass(frozen=True)
class Check:
    """One target or expected ordering: met, missed, or not measured, with its figures."""

    claim: str
    met: bool | None
    figures: str


def check_targets(results: ModelResults, batch: int = 64) -> list[Check]:
    """The issue's targets and ALGORITHMS.md's orderings (end of section 11) on ``results``."""
    t = results.tables
    checks: list[Check] = []

    def mean(key: str, label: str) -> float:
        return t[key].mean(label) if key in t and label in t[key].errors else math.nan

    iid, dirichlet, single = f"iid{batch}", "dirichlet", "single"
    src = {k: mean(k, "source") for k in (iid, dirichlet, single)}
    adapters = [v.label for v in MAIN_VARIANTS if v.adapter != "source"]

    def best(key: str) -> tuple[str, float]:
        scores = [(mean(key, a), a) for a in adapters if not math.isnan(mean(key, a))]
        return (min(scores)[1], min(scores)[0]) if scores else ("-", math.nan)

    def add(claim: str, ok: bool, figures: str, *values: float) -> None:
        measured = not any(math.isnan(x) for x in values)
        checks.append(Check(claim, ok if measured else None, figures))

    label, value = best(iid)
    cut_ = (src[iid] - value) / src[iid] * 100 if src[iid] else math.nan
    add(
        f"i.i.d. B={batch}: best adapter cuts the mean error vs source by >= 45 % relative",
        cut_ >= 45,
        f"source {fmt(src[iid])}, best {label} {fmt(value)}: {fmt(cut_)} % relative",
        cut_,
    )
    unmix, tbn = mean(dirichlet, "unmix_tns"), mean(dirichlet, "tbn")
    add(
        "Dirichlet(0.1): UnMix-TNS <= source",
        unmix <= src[dirichlet],
        f"unmix_tns {fmt(unmix)}, source {fmt(src[dirichlet])}",
        unmix,
        src[dirichlet],
    )
    add(
        "Dirichlet(0.1): UnMix-TNS >= 20 points better than TBN",
        tbn - unmix >= 20,
        f"tbn {fmt(tbn)}, unmix_tns {fmt(unmix)}: {fmt(tbn - unmix)} points",
        tbn - unmix,
    )
    label, value = best(single)
    add(
        "N=1: best adapter >= 5 points better than source",
        src[single] - value >= 5,
        f"source {fmt(src[single])}, best {label} {fmt(value)}: {fmt(src[single] - value)} points",
        src[single] - value,
    )
    # The papers' qualitative orderings; "far" is read as 10 points, "~<=" as within 1 point.
    for adapter in ("tbn", "adabn"):
        value = mean(iid, adapter)
        add(
            f"ordering, i.i.d. B={batch}: {adapter} far below source (>= 10 points)",
            src[iid] - value >= 10,
            f"{adapter} {fmt(value)}, source {fmt(src[iid])}",
            src[iid] - value,
        )
    add(
        "ordering, Dirichlet: tbn above source",
        tbn > src[dirichlet],
        f"tbn {fmt(tbn)}, source {fmt(src[dirichlet])}",
        tbn - src[dirichlet],
    )
    for adapter in ("unmix_tns", "alpha_bn"):
        value = mean(dirichlet, adapter)
        add(
            f"ordering, Dirichlet: {adapter} at or below source",
            value <= src[dirichlet],
            f"{adapter} {fmt(value)}, source {fmt(src[dirichlet])}",
            value - src[dirichlet],
        )
    value = mean(single, "tbn")
    add(
        "ordering, N=1: tbn far above source (>= 10 points)",
        value - src[single] >= 10,
        f"tbn {fmt(value)}, source {fmt(src[single])}",
        value - src[single],
    )
    for adapter in ("alpha_bn", "unmix_tns"):
        value = mean(single, adapter)
        add(
            f"ordering, N=1: {adapter} about at or below source (<= source + 1)",
            value <= src[single] + 1,
            f"{adapter} {fmt(value)}, source {fmt(src[single])}",
            value - src[single],
        )
    return checks


@dataclass(frozen=True)
class Candidate:
    """A candidate default: its mean per protocol, and its gap to source."""

    label: str
    means: dict[str, float]
    gaps: dict[str, float]  # candidate - source, points (positive: worse than source)

    @property
    def overall(self) -> float:
        """Mean error over the protocols (each protocol weighs the same)."""
        return float(np.mean(list(self.means.values())))

    @property
    def worst(self) -> tuple[str, float]:
        """The protocol where it is worst relative to source, and by how much; NaN (no verdict)
        with the first protocol it was not measured on every corruption of."""
        for key, gap in self.gaps.items():
            if math.isnan(gap):
                return key, math.nan
        key = max(self.gaps, key=lambda k: self.gaps[k])
        return key, self.gaps[key]

    def describe_worst(self) -> str:
        key, gap = self.worst
        return f"not measured in {key}" if math.isnan(gap) else f"{key} {gap:+.1f}"


def score_candidates(results: ModelResults, labels: Iterable[str]) -> list[Candidate]:
    """Every candidate's mean per protocol and gap to source (the "never worse" criterion).

    A protocol where a candidate misses a corruption has a NaN mean: a partial mean is another
    stream mix than the source's, so it gives no verdict.
    """
    out = []
    for label in labels:
        means = {k: t.complete_mean(label) for k, t in results.tables.items()}
        gaps = {k: means[k] - results.tables[k].mean("source") for k in means}
        if any(label in t.errors for t in results.tables.values()):
            out.append(Candidate(label, means, gaps))
    return out


BEST_MARGIN = 2.0  # issue 20: the default's mean error within 2 points of the best per protocol


def render_best_everywhere(results: ModelResults) -> list[str]:
    """Issue 20's check: per protocol the best variant among those measured on every corruption,
    each complete variant's gap to it, and the share of the corruption-added error removed,
    (source - variant) / (source - clean source error)."""
    complete = {
        key: {label: t.mean(label) for label, e in t.errors.items() if not np.isnan(e).any()}
        for key, t in results.tables.items()
    }
    keys = [key for key, means in complete.items() if "source" in means]
    if not keys:
        return []
    labels = sorted({label for k in keys for label in complete[k]} - {"source"})
    best = {k: min(complete[k].items(), key=lambda item: item[1]) for k in keys}
    lines = [
        f"### Within {BEST_MARGIN:g} points of the best in every protocol (complete cells only)",
        "",
        "Per protocol the best variant measured on all its corruptions, and every variant's mean "
        "error minus the best's (blank: not measured on every corruption).",
        "",
    ]
    rows: list[list[object]] = [["best", *[f"{best[k][0]} {fmt(best[k][1])}" for k in keys], ""]]
    for label in labels:
        gaps = [complete[k].get(label, math.nan) - best[k][1] for k in keys]
        everywhere = all(label in complete[k] for k in keys)
        worse = any(
            complete[k][label] > complete[k]["source"] for k in keys if label in complete[k]
        )
        if everywhere:
            verdict = "met" if max(gaps) <= BEST_MARGIN and not worse else "missed"
            if verdict == "met" and len(keys) < len(PROTOCOLS):
                verdict = f"met in the {len(keys)} of {len(PROTOCOLS)} protocols measured"
        else:
            verdict = "not measured everywhere"
        rows.append([label, *[_gap(g) for g in gaps], verdict])
    lines.append(
        table(["variant", *keys, f"within {BEST_MARGIN:g} and never worse than source"], rows)
    )
    clean = results.clean.get("source")
    if clean is not None and not math.isnan(clean):
        lines += [
            "",
            f"Share of the corruption-added error removed, (source - variant) / (source - "
            f"{fmt(clean)}, the clean error of the source model), %:",
            "",
        ]
        shares = [
            [
                label,
                *[
                    _share(complete[k]["source"], complete[k].get(label, math.nan), clean)
                    for k in keys
                ],
            ]
            for label in labels
        ]
        lines.append(table(["variant", *keys], shares))
    return lines


def _gap(gap: float) -> str:
    return "" if math.isnan(gap) else f"{gap:+.1f}"


def _share(source: float, error: float, clean: float) -> str:
    return "" if math.isnan(error) else fmt(100 * (source - error) / (source - clean), 0)


def recommend(results: ModelResults, candidates: list[Candidate], batch: int = 64) -> list[str]:
    """Markdown bullet points: the best safe default, and the best configuration per situation."""
    lines = []
    iid = f"iid{batch}"
    safe = [c for c in candidates if c.worst[1] <= 1.0]
    if iid in results.tables:
        src = results.tables[iid].mean("source")
        best_label = min(results.tables[iid].errors, key=results.tables[iid].mean)
        best_gain = src - results.tables[iid].mean(best_label)

        def kept(c: Candidate) -> float:
            return (src - c.means[iid]) / best_gain * 100 if best_gain > 0 else math.nan

        # safe everywhere and most of the i.i.d. gain kept; then the lowest mean over protocols
        keeping = [c for c in safe if kept(c) >= 90] or safe
        if keeping:
            pick = min(keeping, key=lambda c: c.overall)
            lines.append(
                f"- **Default: `{pick.label}`**: never worse than source by more than 1 point "
                f"(worst: {pick.worst[0]}, {pick.worst[1]:+.1f}), keeps {fmt(kept(pick), 0)} % "
                f"of the best i.i.d. B={batch} gain ({fmt(src)} -> {fmt(pick.means[iid])}, best "
                f"{best_label} {fmt(results.tables[iid].mean(best_label))}), and has the lowest "
                f"mean over the protocols of the safe candidates ({fmt(pick.overall)})."
            )
        else:
            measured = [c for c in candidates if not math.isnan(c.worst[1])]
            if measured:
                pick = min(measured, key=lambda c: c.worst[1])
                lines.append(
                    f"- No candidate stays within 1 point of source everywhere; the safest is "
                    f"`{pick.label}` (worst: {pick.describe_worst()} points)."
                )
            elif candidates:
                lines.append("- No candidate is measured on every corruption of every protocol.")
    for t in results.tables.values():
        best_label = min(t.errors, key=t.mean)
        lines.append(
            f"- {t.title}: best `{best_label}` {fmt(t.mean(best_label))} "
            f"(source {fmt(t.mean('source'))})."
        )
    return lines


# ---------------------------------------------------------------------------------- the report


def plot(results: ModelResults, path: Path, title: str, labels: Sequence[str]) -> None:
    """Grouped bars: mean error per adapter (bars) per protocol (groups)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the benchmark machines
    import matplotlib.pyplot as plt

    keys = list(results.tables)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(keys)), 4.5))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = [
            results.tables[k].mean(label) if label in results.tables[k].errors else np.nan
            for k in keys
        ]
        ax.bar(
            np.arange(len(keys)) + (i - (len(labels) - 1) / 2) * width, values, width, label=label
        )
    ax.set_xticks(np.arange(len(keys)), keys)
    ax.set_ylabel("mean error over corruptions (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(name: str) -> str:
    """Corruption names abbreviated for table headers."""
    return {
        "gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul",
        "defocus_blur": "defoc", "glass_blur": "glass", "motion_blur": "motn",
        "zoom_blur": "zoom", "elastic_transform": "elast", "jpeg_compression": "jpeg",
        "brightness": "brit", "contrast": "contr", "pixelate": "pixel",
    }.get(name, name)  # fmt: skip


def _exceptions(args: argparse.Namespace) -> list[str]:
    """The protocols of this run that used another number of images per corruption."""
    out = []
    if "single" in args.protocols and args.single_n not in (None, args.n):
        out.append(f"N=1: {args.single_n} per corruption (one call per image is slow)")
    if "dirichlet" in args.protocols and args.dirichlet_n not in (None, args.n):
        out.append(
            f"Dirichlet: {args.dirichlet_n} per corruption (its label runs grow with the "
            "stream's length; 10,000 gives ~95 % single-class batches of 64)"
        )
    return out


def render(
    all_results: dict[str, ModelResults],
    args: argparse.Namespace,
    device: torch.device,
    runtime: float,
    plot_paths: dict[str, Path],
) -> str:
    """The report section as markdown."""
    names = list(args.corruptions)
    first = next(iter(all_results.values()))
    measured = {label for r in all_results.values() for label in r.clean}
    measured |= {
        label for r in all_results.values() for t in r.tables.values() for label in t.errors
    }
    main = [v.label for v in MAIN_VARIANTS if v.label in measured]
    lines = [
        f"## {args.title}",
        "",
        *[f"Command: `{c}`  " for c in dict.fromkeys(r.command for r in all_results.values())],
        f"Machine: {first.machine}; torch {torch.__version__}; runtime {runtime / 60:.1f} min.  ",
        f"Data: generated CIFAR-10-C (`bench.corruptions`, seed 0) from the JPEG test set, the "
        f"first {args.n} images of each of the {len(names)} corruptions at severity "
        f"{args.severity} ({args.n * len(names)} images per protocol)"
        + "".join(f", except {e}" for e in _exceptions(args))
        + f". Seed {args.seed} for every ordering.  ",
        "Error % (lower is better); `mean` is over the corruptions. Adapters with their papers' "
        "defaults unless a config is shown.",
    ]
    if args.server:
        # a server check runs few images: its offline numbers are not results, only its matches
        return "\n".join(lines[:-1] + render_server(all_results, args))
    for name, results in all_results.items():
        lines += ["", f"### {name}", ""]
        lines.append(
            table(
                ["clean (i.i.d. B=64)", *main],
                [["error %", *[results.clean.get(label, math.nan) for label in main]]],
            )
        )
        lines += ["", "Mean error % per protocol:", ""]
        keys = list(results.tables)
        lines.append(
            table(
                ["variant", *keys],
                [[label, *[results.tables[k].mean(label) for k in keys]] for label in main],
            )
        )
        if name in plot_paths:
            lines += [
                "",
                f"![mean error per adapter and protocol, {name}]({plot_paths[name].name})",
            ]
        for t in results.tables.values():
            lines += [
                "",
                f"#### {name}: {t.title} ({t.per_domain} images per corruption; "
                f"{fmt(100 * t.majority, 0)} % of a batch is its most frequent class)",
                "",
            ]
            rows = [[label, *t.errors[label].tolist(), t.mean(label)] for label in main]
            lines.append(table(["variant", *[_short(c) for c in names], "mean"], rows))
        if results.sweep:
            severities = sorted(results.sweep)
            per_domain = results.sweep[severities[0]].per_domain
            lines += [
                "",
                f"#### {name}: severity sweep, i.i.d. B={args.batch}, mean error % "
                f"({per_domain} images per corruption)",
                "",
            ]
            lines.append(
                table(
                    ["variant", *[f"sev {s}" for s in severities]],
                    [
                        [label, *[results.sweep[s].mean(label) for s in severities]]
                        for label in main
                    ],
                )
            )

    target_model = (
        "cifar10_resnet20" if "cifar10_resnet20" in all_results else next(iter(all_results))
    )
    results = all_results[target_model]
    lines += ["", f"### Targets ({target_model}, severity {args.severity})", ""]
    if args.severity != 5:
        lines.append("The issue's targets are for severity 5; this run used another severity.\n")
    checks = check_targets(results, args.batch)
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    lines.append(
        table(
            ["target / ordering", "result", "figures"],
            [[c.claim, verdict[c.met], c.figures] for c in checks],
        )
    )

    lines += ["", *render_best_everywhere(results)]
    candidates = score_candidates(results, [v.label for v in CANDIDATES])
    if candidates:
        keys = list(results.tables)
        lines += ["", f"### A default never worse than source ({target_model})", ""]
        lines.append(
            "Candidates evaluated on the same streams as the adapters above. Gap = candidate "
            "minus source, mean error points per protocol (positive: worse than source)."
        )
        lines.append("")
        rows = [
            [c.label, *[c.gaps.get(k, math.nan) for k in keys], c.describe_worst()]
            for c in candidates
        ]
        rows += [
            [
                f"{label} (adapter default)",
                *[results.tables[k].mean(label) - results.tables[k].mean("source") for k in keys],
                _worst(results, label),
            ]
            for label in main
            if label != "source"
        ]
        lines.append(table(["candidate", *keys, "worst gap"], rows))
        lines += ["", "Mean error % of the candidates (and of the adapters' defaults):", ""]
        everyone = candidates + score_candidates(results, main)
        lines.append(
            table(
                ["variant", *keys, "mean over protocols"],
                [[c.label, *[c.means.get(k, math.nan) for k in keys], c.overall] for c in everyone],
            )
        )
        lines += ["", "Recommendation (from the numbers above):", ""]
        lines += recommend(results, candidates, args.batch)
    return "\n".join(lines)


def render_server(all_results: dict[str, ModelResults], args: argparse.Namespace) -> list[str]:
    """Markdown lines: per model and protocol, the predictions the server got differently."""
    lines = []
    for name, results in all_results.items():
        labels = sorted({label for m in results.mismatches.values() for label in m})
        lines += [
            "",
            f"### {name}: through the server ({args.server})",
            "",
            "Predictions that differ between the HTTP path (raw uint8 tensors posted in the "
            "protocol's batches, one server stream per offline stream) and the offline engine; "
            "0 everywhere means the served path is the engine's path:",
            "",
            table(
                ["protocol", "images per variant", *labels],
                [
                    [k, results.compared.get(k, "-"), *[m.get(label, "-") for label in labels]]
                    for k, m in results.mismatches.items()
                ],
            ),
        ]
        total = sum(sum(m.values()) for m in results.mismatches.values())
        count = sum(results.compared.values()) * len(labels)
        lines += ["", f"Total: {total} of {count} predictions differ."]
    return lines


def _worst(results: ModelResults, label: str) -> str:
    gaps = {k: t.mean(label) - t.mean("source") for k, t in results.tables.items()}
    key = max(gaps, key=lambda k: gaps[k])
    return f"{key} {gaps[key]:+.1f}"


def results_json(all_results: dict[str, ModelResults]) -> dict:
    """Everything measured, as JSON-ready data (for later analysis)."""

    def tab(t: Table) -> dict:
        return {
            "title": t.title,
            "per_domain": t.per_domain,
            "majority": t.majority,
            "errors": {
                k: [None if math.isnan(x) else x for x in v.tolist()] for k, v in t.errors.items()
            },
        }

    return {
        name: {
            "clean": r.clean,
            "tables": {k: tab(t) for k, t in r.tables.items()},
            "sweep": {str(s): tab(t) for s, t in r.sweep.items()},
            "mismatches": r.mismatches,
            "compared": r.compared,
            "seconds": r.seconds,
            "command": r.command,
            "machine": r.machine,
        }
        for name, r in all_results.items()
    }


def load_results(data: dict) -> dict[str, ModelResults]:
    """The inverse of :func:`results_json`."""

    def tab(t: dict) -> Table:
        errors = {
            k: np.array([math.nan if x is None else x for x in v], dtype=float)
            for k, v in t["errors"].items()
        }
        return Table(t["title"], t["per_domain"], errors, t.get("majority", math.nan))

    return {
        name: ModelResults(
            clean=r["clean"],
            tables={k: tab(t) for k, t in r["tables"].items()},
            sweep={int(s): tab(t) for s, t in r["sweep"].items()},
            mismatches=r.get("mismatches", {}),
            compared=r.get("compared", {}),
            seconds=r.get("seconds", 0.0),
            command=r.get("command", ""),
            machine=r.get("machine", ""),
        )
        for name, r in data.items()
    }


# ------------------------------------------------------------------------------ command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cifar10_resnet20", "cifar10_resnet32"])
    p.add_argument("--n", type=int, default=1000, help="images per corruption (max 10000)")
    p.add_argument("--single-n", type=int, default=200, help="images per corruption at N=1")
    p.add_argument(
        "--dirichlet-n", type=int, default=None, help="images per corruption, Dirichlet (--n)"
    )
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--sweep-model", default="cifar10_resnet20", help="'' for no severity sweep")
    p.add_argument("--sweep", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--sweep-n", type=int, default=None, help="images per corruption, sweep (--n)")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--iid-batches", nargs="+", type=int, default=[64, 200])
    p.add_argument("--batch", type=int, default=64, help="batch size of the other protocols")
    p.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), default=list(CORRUPTIONS))
    p.add_argument("--no-candidates", action="store_true", help="skip the default candidates")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        metavar="LABEL",
        help="run only these variants, by label, e.g. 'adabn(prior_images=64, window=512)' (all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--engine-mode",
        choices=["eager", "compiled"],
        default="eager",
        help="compiled: engine/compiled.py, for the protocols of thousands of forwards of one "
        "layout (continual, mixed, N=1); predictions equal the eager engine's",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="images per forward (default 1024 CPU, 16384 GPU)",
    )
    p.add_argument("--server", default=None, help="also replay the streams through this tta-serve")
    p.add_argument(
        "--server-variants", nargs="*", default=[], help="labels to check via the server (all)"
    )
    p.add_argument("--out", type=Path, default=Path("docs/accuracy.md"))
    p.add_argument("--section", default="offline", help="marked section of --out to (re)write")
    p.add_argument("--title", default=None, help="heading of the section")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument(
        "--full",
        action="store_true",
        help="full size: all 10,000 images per corruption in every protocol, no sweep",
    )
    p.add_argument(
        "--cells",
        type=Path,
        default=Path("bench/results/accuracy-cells.json"),
        help="results per (model, protocol, variant, corruption), written as they finish",
    )
    p.add_argument(
        "--resume", action="store_true", help="skip what --cells already holds at this size"
    )
    p.add_argument("--skip-clean", action="store_true", help="no clean-error run")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="run nothing: the report from what --cells holds (with --resume)",
    )
    p.add_argument(
        "--variants-per-piece",
        type=int,
        default=3,
        help="variants run together before their results are stored (more: fewer forwards)",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="render the report from a --json file (of a finished or stopped run) instead",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TTA_MODEL_CACHE_DIR", ".cache/models")),
        help="model weights cache",
    )
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar10"))
    p.add_argument("--data-cache", type=Path, default=Path(".cache/data"))
    args = p.parse_args(argv)
    if args.full:
        args.n = args.single_n = 10_000
        args.dirichlet_n = None
        args.sweep_model = ""
    if args.max_batch is None:
        args.max_batch = 16384 if args.device.startswith("cuda") else 1024
    if args.title is None:
        args.title = f"Accuracy under shift ({args.section})"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write its section of the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = list(MAIN_VARIANTS) + ([] if args.no_candidates else list(CANDIDATES))
    if args.variants is not None:
        variants = [v for v in variants if v.label in args.variants]
    all_results: dict[str, ModelResults] = {}

    def save(name: str, results: ModelResults) -> None:
        all_results[name] = results
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results_json(all_results), indent=1))

    if args.from_json is not None:
        all_results = load_results(json.loads(args.from_json.read_text()))
    else:
        for name in args.models:
            save(name, run_model(name, args, device, variants, partial(save, name)))
    runtime = sum(r.seconds for r in all_results.values())

    stem = args.out.stem + ("" if args.section == "offline" else f"-{args.section}")
    plot_paths = {}
    for name, results in all_results.items():
        if args.server:
            break  # the server check reports matches, not errors: nothing to plot
        path = args.out.parent / f"{stem}-{name}.png"
        plot(
            results,
            path,
            f"{name}, severity {args.severity}, {args.n}/corruption",
            [v.label for v in MAIN_VARIANTS if v.label in results.clean],
        )
        plot_paths[name] = path
    body = render(all_results, args, device, runtime, plot_paths)
    write_section(args.out, args.section, body, title="Accuracy under distribution shift")
    log.info("wrote %s (section %s) in %.1f min", args.out, args.section, runtime / 60)


if __name__ == "__main__":
    main()
