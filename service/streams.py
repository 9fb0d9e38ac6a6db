"""The stream registry: which streams exist, which hold a slot, and where their state persists.

Two halves, each used from one place only, so no lock guards stream state:

- :class:`StreamRegistry` lives on the event loop: the set of registered streams (id, model,
  adapter, config, TTL, last use), id validation, creation, deletion, TTL expiry, restore at
  start-up. Every engine call it needs is sent to the model's engine thread.
- :class:`StreamSlots` lives on one model's engine thread: the streams that hold a slot in the
  engine's state pools, in LRU order. Loading a stream that has no slot evicts the least recently
  used one, whose state is written back to the store first; an evicted stream is reloaded from
  the store, transparently, on its next request.

Store writes go through :class:`StoreWriter`, one thread that applies them in order and lets
reads see the writes it has not finished yet, so an evicted stream is never reloaded stale.

With a shared store (Redis, several replicas) a resident stream is also a lease: the slot is
served only while this replica owns the stream, every write is fenced by the lease's token and
the version it was derived from, and a copy whose write lost (another replica moved the stream
on) is dropped and reloaded before the stream is served again (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from adapters import ADAPTERS, StateMismatchError, get_adapter
from adapters.pool import PoolFullError, StateMemoryError
from engine.core import Engine, PoolKey, StreamHandle
from service.errors import (
    CapacityError,
    InvalidConfigError,
    InvalidStreamIdError,
    ModelNotServedError,
    QuotaExceededError,
    ServiceError,
    SnapshotNotFoundError,
    StoreUnavailableError,
    StreamConflictError,
    StreamExistsError,
    StreamNotFoundError,
    UnusableStateError,
)
from service.feedback import Feedback, FeedbackWindow, PredictionLog
from service.idempotency import IdempotencyCache
from service.metrics import Metrics, ObservedStream, StreamSignal
from service.safety import RECOMMENDED, SafetyLimits, Snapshot, Watch, check, resolve_policy
from service.stores import (
    NO_LEASE,
    Lease,
    StateStore,
    StoreConflictError,
    StoreError,
    StreamInfo,
    StreamRecord,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A stream's key in the registry and the store: its id, after its tenant and a slash if it has
# one. Ids are unique per tenant; streams of no tenant (authentication off) keep their bare ids.
STREAM_KEY = re.compile(r"^(?:[a-z0-9][a-z0-9_-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SERVICE_METADATA_KEY = "tta-serve.service"


def validate_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` if it is a valid id; InvalidStreamIdError otherwise."""
    if not STREAM_ID.fullmatch(stream_id):
        raise InvalidStreamIdError(
            f"invalid stream id {stream_id[:140]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return stream_id


def validate_stream_key(key: str) -> str:
    """Return ``key`` if it is a valid stream key; InvalidStreamIdError otherwise."""
    if not STREAM_KEY.fullmatch(key):
        validate_stream_id(key.rpartition("/")[2])
        raise InvalidStreamIdError(f"invalid stream key {key[:200]!r}")
    return key


def stream_key(tenant: str, stream_id: str) -> str:
    """The key of a tenant's stream: ``<tenant>/<id>``, or the bare id without a tenant."""
    return f"{tenant}/{stream_id}" if tenant else stream_id


def public_id(key: str) -> str:
    """The id of the stream of ``key``, as its tenant names it."""
    return key.rpartition("/")[2]


def tenant_of(key: str) -> str:
    """The tenant of the stream of ``key`` ("" for none)."""
    return key.rpartition("/")[0]


def new_stream_id() -> str:
    """A random stream id."""
    return "s-" + secrets.token_hex(8)


# --- service metadata in the state file ------------------------------------------------------


def attach_metadata(state: bytes, metadata: dict[str, Any]) -> bytes:
    """The engine's safetensors ``state`` with the service's ``metadata`` added to its header.

    The header is JSON after an 8-byte length and tensor offsets are relative to the data that
    follows it, so the header can grow without touching the tensors. The engine ignores the key.
    """
    size = int.from_bytes(state[:8], "little")
    header = json.loads(state[8 : 8 + size])
    header.setdefault("__metadata__", {})[SERVICE_METADATA_KEY] = json.dumps(
        metadata, sort_keys=True
    )
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + state[8 + size :]


def without_metadata(state: bytes) -> bytes:
    """The state without the service metadata: what the engine parses (its header bounded)."""
    size = int.from_bytes(state[:8], "little")
    try:
        header = json.loads(state[8 : 8 + size])
        header["__metadata__"].pop(SERVICE_METADATA_KEY)
    except (ValueError, KeyError, TypeError, AttributeError):
        return state
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + state[8 + size :]


def read_metadata(state: bytes) -> dict[str, Any]:
    """The service metadata of a state file ({} if it has none or the header is malformed)."""
    try:
        size = int.from_bytes(state[:8], "little")
        header = json.loads(state[8 : 8 + size])
        metadata = json.loads(header["__metadata__"][SERVICE_METADATA_KEY])
    except (ValueError, KeyError, TypeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


MAX_SAMPLES = 2**53  # every count up to it is exact in a float64 (and in any JSON parser)


def samples_of(state: bytes) -> int:
    """The number of images a stored or imported stream has adapted to (0 when absent).

    StateMismatchError unless it is an integer (not a bool) from 0 to 2**53.
    """
    samples = read_metadata(state).get("samples", 0)
    if type(samples) is not int or not 0 <= samples <= MAX_SAMPLES:
        raise StateMismatchError(
            f"the state's sample count {str(samples)[:40]} is not an integer from 0 to 2**53"
        )
    return samples


def listed_samples(state: bytes) -> int:
    """The sample count to list a stored stream with: 0 where the record's is invalid."""
    try:
        return samples_of(state)
    except StateMismatchError:
        return 0


def store_failure(error: StoreError, action: str) -> ServiceError:
    """The HTTP error of a failed store operation: 409 if another replica moved on, else 503."""
    if isinstance(error, StoreConflictError):
        return StreamConflictError(f"cannot {action}: {error}", error.retry_after_s)
    return StoreUnavailableError(f"cannot {action}: {error}")


def signal_of(state: bytes) -> StreamSignal | None:
    """The last signals of a stored stream (None when it has none: fresh, or stored before)."""
    return StreamSignal.from_dict(read_metadata(state).get("signal"))


# --- store writer ----------------------------------------------------------------------------


class StoreWriter:
    """Applies store writes in submission order on one thread; reads see pending writes.

    A failed put stays pending (and readable), and :meth:`retry_failed` submits it again, so a
    stream's newest state is never lost to a store that was briefly down while the process runs.
    """

    def __init__(self, store: StateStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tta-store")
        self._lock = threading.Lock()
        self._sequence = 0
        # id -> (sequence of the newest op, record to write or None for a deletion, its token)
        self._pending: dict[str, tuple[int, StreamRecord | None, int | None]] = {}
        self._failed: dict[str, int] = {}
        self._lost: set[str] = set()  # streams whose fenced write lost: their copy is stale

    def put(self, record: StreamRecord, token: int | None = None) -> Future[None]:
        """Write ``record`` (after every write submitted before it), fenced by ``token``."""
        return self._submit(record.id, record, token)

    def pending_lease(self, stream_id: str) -> Lease | None:
        """The lease of this replica's own pending (unsaved) write of the stream, if any.

        What a stream is served with while the store is down: the write was this replica's,
        under that token; if another replica took the stream over, the write is fenced and
        the stream reloaded.
        """
        with self._lock:
            pending = self._pending.get(stream_id)
        if pending is None or pending[1] is None:
            return None
        return Lease(token=pending[2] or 0, version=pending[1].version)

    def lost(self, stream_id: str) -> bool:
        """True once if a fenced write of the stream lost since the last call: reload it."""
        with self._lock:
            if stream_id in self._lost:
                self._lost.discard(stream_id)
                return True
            return False

    def delete(self, stream_id: str) -> Future[None]:
        """Delete the stream's record (after every write submitted before it)."""
        return self._submit(stream_id, None, None)

    def get(self, stream_id: str, model: str = "") -> StreamRecord | None:
        """The stream's newest record: a pending write if any, else the store's (may raise).

        ``model`` labels the read's latency (empty when the caller does not know it yet).
        """
        with self._lock:
            pending = self._pending.get(stream_id)
        if pending is not None:
            return pending[1]
        started = time.perf_counter()
        try:
            record = self.store.get(stream_id)
        except StoreError:
            self.metrics.store_errors.labels("get").inc()
            self.metrics.store_up.set(0)
            raise
        else:
            self.metrics.store_up.set(1)
            return record
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.stage_latency.labels(model, "store").observe(elapsed)

    def retry_failed(self) -> list[Future[None]]:
        """Submit the failed writes again."""
        with self._lock:
            failed = [(sid, self._pending[sid]) for sid in self._failed if sid in self._pending]
        return [self._submit(sid, record, token) for sid, (_, record, token) in failed]

    def close(self) -> None:
        """Finish every submitted write, then stop the thread."""
        self._executor.shutdown(wait=True)

    def _submit(
        self, stream_id: str, record: StreamRecord | None, token: int | None
    ) -> Future[None]:
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
            self._pending[stream_id] = (sequence, record, token)
        return self._executor.submit(self._apply, stream_id, record, token, sequence)

    def _apply(
        self, stream_id: str, record: StreamRecord | None, token: int | None, sequence: int
    ) -> None:
        operation = "delete" if record is None else "put"
        started = time.perf_counter()
        try:
            if record is None:
                self.store.delete(stream_id)
            else:
                self.store.put(record, token)
        except StoreConflictError:
            # Never retried: the store holds a newer state, which this write must not replace.
            self.metrics.store_errors.labels(operation).inc()
            with self._lock:
                self._lost.add(stream_id)
                if self._pending.get(stream_id, (None,))[0] == sequence:
                    del self._pending[stream_id]
                self._failed.pop(stream_id, None)
            raise
        except StoreError:
            self.metrics.store_errors.labels(operation).inc()
            self.metrics.store_up.set(0)
            with self._lock:
                self._failed[stream_id] = sequence
            raise
        finally:
            elapsed = time.perf_counter() - started
            model = record.model if record is not None else ""
            self.metrics.stage_latency.labels(model, "store").observe(elapsed)
        self.metrics.store_up.set(1)
        with self._lock:
            if self._pending.get(stream_id, (None,))[0] == sequence:
                del self._pending[stream_id]
                self._failed.pop(stream_id, None)


# --- slots (engine thread) -------------------------------------------------------------------


@dataclass(eq=False)
class Resident:
    """A stream that holds a slot: its handle, sample count, last signals, whether it is unsaved."""

    info: StreamInfo
    handle: StreamHandle
    samples: int = 0
    signal: StreamSignal | None = None
    dirty: bool = False
    version: int = 0  # the stored version this copy is at (its newest write's, once applied)
    token: int = 0  # the fencing token of this replica's lease on the stream
    renew_at: float = math.inf  # when (monotonic) to renew the lease before serving again
    # Safety (docs/safety.md): the auto-reset detector, the remembered Idempotency-Keys
    # (stored with the state), the good states kept in memory for rollback.
    watch: Watch = field(default_factory=Watch)
    # (the slots replace it with one bounded by their limits when they load the stream)
    requests: IdempotencyCache = field(default_factory=lambda: IdempotencyCache(32, 3600.0))
    snapshots: deque[Snapshot] = field(default_factory=deque)
    since_snapshot: int = 0


class StreamSlots:
    """The streams of one model that hold a slot, in LRU order; used on its engine thread only.

    Args:
        engine: the model's engine.
        writer: where evicted and persisted states go, and where evicted streams come from.
        max_streams: streams that may hold a slot at once; beyond, the LRU one is evicted.
        metrics: the app's metrics.
    """

    def __init__(
        self, engine: Engine, writer: StoreWriter, max_streams: int, metrics: Metrics
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.max_streams = max_streams
        self.metrics = metrics
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.limits = SafetyLimits()  # set by the registry from the settings

    @property
    def model(self) -> str:
        """The model's name."""
        return self.engine.name

    @property
    def leased(self) -> bool:
        """Whether the store is shared: streams are served under leases, writes are fenced."""
        return self.writer.store.lease_ttl_s is not None

    def open(self, info: StreamInfo, pinned: frozenset[str] = frozenset()) -> Resident:
        """Give a new stream a slot with a fresh state (its seed picked now if it has none)."""
        lease = self._acquire(info.id, "save stream")
        seed = info.seed if info.seed >= 0 else None
        handle = self._allocate(info, seed, pinned)
        resident = Resident(replace(info, seed=handle.seed), handle)
        self._load_safety(resident, {})
        self._lease(resident, lease)
        self.resident[info.id] = resident
        self._count()
        return resident

    def _acquire(self, stream_id: str, action: str = "serve stream") -> Lease:
        """This replica's lease on the stream (StreamConflictError if another replica owns it)."""
        if not self.leased:
            return NO_LEASE
        try:
            return self.writer.store.acquire(stream_id)
        except StoreError as error:
            if not isinstance(error, StoreConflictError):
                self.metrics.store_errors.labels("lease").inc()
            raise store_failure(error, f"{action} {stream_id!r}") from None

    def _lease(self, resident: Resident, lease: Lease) -> None:
        ttl = self.writer.store.lease_ttl_s
        resident.token, resident.version = lease.token, lease.version
        # renewed well before it lapses, so a slow request never runs on an expired lease
        resident.renew_at = math.inf if ttl is None else time.monotonic() + ttl / 3

    def _still_owned(self, resident: Resident) -> bool:
        """Renew the lease if due; False (the copy dropped) if the stored stream moved on."""
        stream_id = resident.info.id
        if self.writer.lost(stream_id):
            self.close(stream_id)
            return False
        if time.monotonic() < resident.renew_at:
            return True
        try:
            lease = self._acquire(stream_id)
        except StreamConflictError:
            self.close(stream_id)  # another replica serves it: this copy is stale from now on
            raise
        if lease.token != resident.token and lease.version != resident.version:
            self.close(stream_id)  # the lease lapsed and someone wrote meanwhile
            return False
        self._lease(resident, replace(lease, version=resident.version))
        return True

    def ensure(self, info: StreamInfo, pinned: frozenset[str] = frozenset()) -> Resident:
        """The stream's slot, reloading it from the store if it was evicted."""
        resident = self.resident.get(info.id)
        if resident is not None and not self._still_owned(resident):
            resident = None
        # created_at tells a stream from a later one with the same id (deleted and re-created
        # while a request of the old one was queued): that request finds no stream.
        if resident is not None and resident.info.created_at == info.created_at:
            self.resident.move_to_end(info.id)
            return resident
        if resident is not None:
            raise StreamNotFoundError(f"stream {info.id!r} not found (it was deleted)")
        try:
            lease = self._acquire(info.id)
        except StoreUnavailableError:
            pending = self.writer.pending_lease(info.id)
            if pending is None:
                raise
            lease = pending  # the store is down; this replica's own unsaved state is the newest
        try:
            record = self.writer.get(info.id, info.model)
        except StoreError as error:
            raise store_failure(error, f"load stream {info.id!r}") from None
        if record is None or record.created_at != info.created_at:
            raise StreamNotFoundError(f"stream {info.id!r} not found")
        handle = self._allocate(info, info.seed, pinned)
        try:
            samples = samples_of(record.state)
            handle = self.engine.import_stream(handle, without_metadata(record.state))
        except StateMismatchError as error:
            self.engine.close_stream(handle)
            raise UnusableStateError(
                f"the stored state of stream {info.id!r} cannot be loaded ({error}): "
                "reset the stream or import a state"
            ) from None
        resident = Resident(info, handle, samples, signal_of(record.state))
        self._load_safety(resident, read_metadata(record.state))
        self._lease(resident, replace(lease, version=record.version))
        self.resident[info.id] = resident
        self._count()
        return resident

    def claim(self, info: StreamInfo) -> Resident:
        """The stream's slot for replacing its whole state (reset, import), without loading it.

        A resident stream keeps its slot; any other gets a fresh one, so a stored state that
        cannot be loaded never stands in the way of the operations that replace it.
        """
        resident = self.resident.get(info.id)
        if resident is not None and not self._still_owned(resident):
            resident = None
        if resident is None:
            return self.open(info)
        if resident.info.created_at != info.created_at:
            raise StreamNotFoundError(f"stream {info.id!r} not found (it was deleted)")
        self.resident.move_to_end(info.id)
        return resident

    def newest(self, info: StreamInfo) -> StreamRecord | None:
        """The stream's newest record: its resident state, else the store's record (not parsed).

        What an operation that fails on the store puts back (StoreError if the store is down).
        """
        resident = self.resident.get(info.id)
        if resident is not None and resident.info.created_at == info.created_at:
            return resident.info.record(self.export(resident))
        return self.writer.get(info.id, info.model)

    def restore(self, info: StreamInfo, before: StreamRecord | None) -> None:
        """Undo a replaced state whose store write failed: the stream is as ``before`` again.

        ``before`` is written again, after the failed write, so the store ends with it too.
        """
        resident = self.resident.get(info.id)
        if resident is not None and before is not None:
            try:
                resident.samples = samples_of(before.state)
                resident.signal = signal_of(before.state)
                resident.handle = self.engine.import_stream(
                    resident.handle, without_metadata(before.state)
                )
                self._load_safety(resident, read_metadata(before.state))
                resident.info = replace(resident.info, seed=resident.handle.seed)
                resident.dirty = False
            except StateMismatchError:
                self.close(info.id)  # it could not be loaded before either: it stays stored only
            else:
                self.persist(resident)  # after the failed write, fenced like every write
                return
        elif resident is not None:
            self.close(info.id)
        if before is not None:
            self.writer.put(before)

    def close(self, stream_id: str) -> None:
        """Free the stream's slot without saving it."""
        resident = self.resident.pop(stream_id, None)
        if resident is not None:
            self.engine.close_stream(resident.handle)
            self._count()

    def export(self, resident: Resident, requests: bool = True) -> bytes:
        """The stream's state with the service metadata (sample count, last signals, ...).

        The signals travel with the state, so a restarted server (or another replica) publishes
        a stream's last values before it sees the stream again. So do its auto-reset count and,
        with ``requests``, its remembered Idempotency-Keys: stored in the same write as the
        state they produced (an export for the API leaves them out).
        """
        metadata: dict[str, Any] = {"samples": resident.samples}
        if resident.signal is not None:
            metadata["signal"] = resident.signal.to_dict()
        if resident.watch.resets:
            metadata["auto_resets"] = resident.watch.resets
        if requests and len(resident.requests):
            metadata["requests"] = resident.requests.to_list()
        return attach_metadata(self.engine.export_stream(resident.handle), metadata)

    def _load_safety(self, resident: Resident, metadata: dict[str, Any]) -> None:
        """The stream's stored auto-reset count and Idempotency-Keys, bounded by the limits."""
        limits = self.limits
        resident.requests = IdempotencyCache.from_list(
            metadata.get("requests"), limits.idempotency_max_keys, limits.idempotency_window_s
        )
        resets = metadata.get("auto_resets", 0)
        resident.watch.resets = resets if type(resets) is int and resets >= 0 else 0

    # --- safety (docs/safety.md) ---

    def after_adapt(self, resident: Resident, summary: dict[str, Any], images: int) -> str | None:
        """Check a stream after an adapted batch: auto-reset it, or keep a good snapshot.

        Returns the auto-reset's reason, if one happened.
        """
        policy = resolve_policy(resident.info.auto_reset)
        if policy is not None:
            reason = check(policy, summary, resident.watch)
            if reason is not None:
                self._auto_reset(resident, policy.action, reason)
                return reason
            good = True
        else:  # no policy: a state is good if the recommended preset would keep it
            good = check(RECOMMENDED, summary, Watch()) is None
        keep = min(resident.info.snapshots, self.limits.max_snapshots)
        resident.since_snapshot += images
        if keep and good and resident.since_snapshot >= self.limits.snapshot_interval_images:
            state = self.export(resident, requests=False)
            resident.snapshots.append(Snapshot(resident.samples, time.time(), state))
            while len(resident.snapshots) > keep:
                resident.snapshots.popleft()
            resident.since_snapshot = 0
        return None

    def _auto_reset(self, resident: Resident, action: str, reason: str) -> None:
        """Give the stream its initial state, or its last good snapshot; count and log it."""
        watch = resident.watch
        if action == "rollback" and resident.snapshots:
            snapshot = resident.snapshots[-1]
            self.roll_back(resident, snapshot)
            done = f"rolled back to its snapshot at {snapshot.samples} images"
        else:
            action = "reset"
            self.engine.reset_stream(resident.handle)
            resident.samples, resident.signal = 0, None
            done = "reset to its initial state"
        watch.resets += 1
        watch.baseline = None
        watch.last_reason, watch.last_reset_at = reason, time.time()
        resident.since_snapshot = 0
        self.metrics.auto_resets.labels(self.model, reason, action).inc()
        logger.warning("stream %s auto-reset (%s): %s", resident.info.id, reason, done)

    def roll_back(self, resident: Resident, snapshot: Snapshot) -> None:
        """Load a snapshot's state into the stream's slot."""
        info = resident.info
        parsed = self.engine.parse_state(
            info.adapter, info.config, without_metadata(snapshot.state)
        )
        resident.handle = self.engine.load_stream(resident.handle, parsed)
        resident.samples = snapshot.samples
        resident.signal = signal_of(snapshot.state)

    def persist(self, resident: Resident) -> Future[None]:
        """Write the stream's current state to the store (in order with every other write).

        The write is the next version of the one this copy was derived from, fenced by the
        lease: it fails (StoreConflictError) if another replica wrote or took the stream since.
        """
        resident.dirty = False
        resident.version += 1
        record = replace(resident.info.record(self.export(resident)), version=resident.version)
        token = resident.token if self.leased else None
        return self.writer.put(record, token)

    def release_all(self) -> None:
        """Give up the lease of every resident stream (at shutdown, after the final flush)."""
        for stream_id, resident in list(self.resident.items()):
            if self.leased:
                try:
                    self.writer.store.release(stream_id, resident.token)
                except StoreError as error:
                    logger.warning("releasing stream %s: %s", stream_id, error)

    def flush(self) -> list[Future[None]]:
        """Persist every stream with unsaved changes."""
        return [self.persist(r) for r in list(self.resident.values()) if r.dirty]

    def evict(self, stream_id: str) -> Future[None] | None:
        """Write the stream back to the store (if it changed since last saved), free its slot."""
        resident = self.resident.pop(stream_id, None)
        if resident is None:
            return None
        future = self.persist(resident) if resident.dirty else None
        self.engine.close_stream(resident.handle)
        self.metrics.streams_evicted.labels(self.model).inc()
        self._count()
        logger.debug("evicted stream %s of %s", stream_id, self.model)
        return future

    def _allocate(self, info: StreamInfo, seed: int | None, pinned: frozenset[str]) -> StreamHandle:
        """A slot for the stream, evicting LRU streams (never a pinned one) to make room."""
        while len(self.resident) >= self.max_streams:
            if not self._evict_lru(pinned, None):
                raise self._capacity_error()
        key = self.engine.pool_key(info.adapter, info.config)
        while True:
            try:
                return self.engine.open_stream(info.adapter, info.config, seed)
            except PoolFullError as error:
                # A full pool, or one that may not grow: an LRU stream of it makes room.
                if self._evict_lru(pinned, key):
                    continue
                if isinstance(error, StateMemoryError):
                    self.metrics.state_memory_refusals.labels(self.model).inc()
                    raise
                raise self._capacity_error() from None

    def _evict_lru(self, pinned: frozenset[str], key: PoolKey | None) -> bool:
        for stream_id, resident in self.resident.items():
            if stream_id in pinned or (key is not None and resident.handle.pool != key):
                continue
            self.evict(stream_id)
            return True
        return False

    def _capacity_error(self) -> CapacityError:
        return CapacityError(
            f"every stream slot of model {self.model} is in use by requests in flight "
            f"(max_streams={self.max_streams}, slots_per_pool={self.engine.capacity})"
        )

    def _count(self) -> None:
        self.metrics.streams_active.labels(self.model).set(len(self.resident))
        held = self.engine.state_bytes()
        for adapter in ADAPTERS:
            self.metrics.state_memory.labels(self.model, adapter).set(held.get(adapter, 0))


# --- registry (event loop) -------------------------------------------------------------------


class ModelThread(Protocol):
    """What the registry needs of a served model: ``service.runtime.ModelRuntime``.

    A protocol, so that this module does not import the runtime, which is built on it.
    """

    @property
    def engine(self) -> Engine:
        """The model's engine (only its thread-safe parts are used off its thread)."""
        ...

    @property
    def slots(self) -> StreamSlots:
        """The model's slots (engine thread only)."""
        ...

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model's engine thread."""
        ...


R = TypeVar("R", bound=ModelThread)


@dataclass(eq=False)
class StreamEntry:
    """A registered stream as the event loop sees it."""

    info: StreamInfo
    last_used: float = field(default_factory=time.monotonic)
    samples: int = 0
    signal: StreamSignal | None = None
    state_bytes: int = 0  # its state's size as stored (what the tenant's quota counts)
    auto_resets: int = 0
    last_auto_reset: tuple[str, float] | None = None  # (reason, unix time), since start-up
    snapshots: list[tuple[int, float]] = field(default_factory=list)  # (samples, unix time)
    feedback: Feedback | None = None  # with feedback on: the prediction log, live accuracy


@dataclass(frozen=True)
class SafetyOutcome:
    """What the safety checks did to a stream after a forward (for its entry)."""

    auto_reset: str | None  # the reason, if the stream was auto-reset after this forward
    samples: int  # the stream's sample count after the checks (0 after a reset)
    auto_resets: int
    snapshots: list[tuple[int, float]]  # (samples, unix time) of the kept snapshots


class StreamRegistry(Generic[R]):
    """Every registered stream of the app, across its models; used on the event loop only.

    Args:
        runtimes: the served models' runtimes, by name.
        writer: the store writer shared by all models.
        sync: persist each change before answering (``durability=sync``).
        default_ttl_s: TTL of streams created without one (None: no expiry).
        metrics: the app's metrics.
    """

    def __init__(
        self,
        runtimes: Mapping[str, R],
        writer: StoreWriter,
        *,
        sync: bool,
        default_ttl_s: float | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        limits: SafetyLimits | None = None,
    ) -> None:
        self.runtimes = runtimes
        self.writer = writer
        self.sync = sync
        self.default_ttl_s = default_ttl_s
        self.metrics = metrics
        self.clock = clock
        self.limits = limits = limits or SafetyLimits()
        for runtime in runtimes.values():
            runtime.slots.limits = limits
        self.entries: dict[str, StreamEntry] = {}
        # ids being created or deleted: not looked up in the store, whose record is not final
        self._reserved: set[str] = set()

    # --- lookup ---

    def runtime(self, model: str) -> R:
        """The runtime of a served model; ModelNotServedError otherwise."""
        try:
            return self.runtimes[model]
        except KeyError:
            raise ModelNotServedError(
                f"model {model!r} is not served here; served: {', '.join(sorted(self.runtimes))}"
            ) from None

    def get(self, stream_id: str, *, touch: bool = True) -> StreamEntry:
        """The stream's entry (by key, see :func:`stream_key`); StreamNotFoundError if none.

        ``touch`` marks the stream used (its TTL counts from now); reading its metadata does not.
        """
        validate_stream_key(stream_id)
        entry = self.entries.get(stream_id)
        if entry is None:
            raise StreamNotFoundError(f"stream {public_id(stream_id)!r} not found")
        if touch:
            entry.last_used = self.clock()
        return entry

    async def find(self, stream_id: str, *, touch: bool = True) -> StreamEntry:
        """Like :meth:`get`, but a stream unknown here is looked up in the store.

        With a shared store (Redis) another replica may have created the stream, or handed it
        over; it is registered here and loaded into a slot on first use.
        """
        validate_stream_key(stream_id)
        if stream_id in self.entries or stream_id in self._reserved:
            return self.get(stream_id, touch=touch)
        try:
            record = await asyncio.to_thread(self.writer.get, stream_id)
        except StoreError as error:
            raise store_failure(error, f"look up stream {stream_id!r}") from None
        if stream_id not in self.entries and record is not None and self._servable(record):
            self.entries[stream_id] = self._entry(record)
            self._count(record.model)
            logger.info("stream %s found in the store", stream_id)
        return self.get(stream_id, touch=touch)

    def _servable(self, record: StreamRecord) -> bool:
        """Whether a stored stream can be served here: its model is, its key names its tenant."""
        return record.model in self.runtimes and tenant_of(record.id) == record.tenant

    def _entry(self, record: StreamRecord) -> StreamEntry:
        """The entry of a stored stream (used from now), with its stored samples and signals."""
        resets = read_metadata(record.state).get("auto_resets", 0)
        return self._new_entry(
            StreamInfo.of(record),
            samples=listed_samples(record.state),
            signal=signal_of(record.state),
            state_bytes=len(record.state),
            auto_resets=resets if type(resets) is int else 0,
        )

    def _new_entry(self, info: StreamInfo, **values: Any) -> StreamEntry:
        """A stream's entry (used from now), with its feedback window if feedback is on."""
        entry = StreamEntry(info, last_used=self.clock(), **values)
        if info.feedback:
            entry.feedback = Feedback(
                PredictionLog(self.limits.feedback_max_requests),
                FeedbackWindow(self.limits.feedback_window),
            )
        return entry

    def page(self, offset: int, limit: int, tenant: str = "") -> tuple[list[StreamEntry], int]:
        """The tenant's entries sorted by id, ``limit`` from ``offset``, and their count."""
        ids = sorted(key for key in self.entries if tenant_of(key) == tenant)
        return [self.entries[i] for i in ids[offset : offset + limit]], len(ids)

    def held(self, tenant: str) -> tuple[int, int]:
        """The tenant's streams (those being created included) and their states' bytes."""
        entries = [e for key, e in self.entries.items() if tenant_of(key) == tenant]
        creating = sum(1 for key in self._reserved if tenant_of(key) == tenant)
        return len(entries) + creating, sum(e.state_bytes for e in entries)

    def observed(self) -> list[ObservedStream]:
        """Every stream as the metrics see it (read at each scrape)."""
        return [
            ObservedStream(
                sid,
                e.info.model,
                e.info.adapter,
                e.samples,
                e.signal,
                auto_resets=e.auto_resets,
                accuracy=e.feedback.window.accuracy() if e.feedback is not None else None,
            )
            for sid, e in self.entries.items()
        ]

    def record(
        self,
        entry: StreamEntry,
        samples: int,
        signal: StreamSignal | None,
        safety: SafetyOutcome | None = None,
    ) -> None:
        """Note a stream's sample count and signals after a forward, whichever API sent it."""
        entry.samples = samples
        if signal is not None:
            entry.signal = signal
        if safety is not None:
            if safety.auto_reset is not None:
                entry.samples = safety.samples
                entry.signal = None  # the signals were the collapsed state's
                entry.last_auto_reset = (safety.auto_reset, time.time())
            entry.auto_resets = safety.auto_resets
            entry.snapshots = safety.snapshots

    async def refresh(self, entry: StreamEntry) -> None:
        """Re-read a stream's sample count and signals from the store (its copy here lost a write).

        Best effort: if the store cannot be read, the entry keeps its last acknowledged values.
        """
        try:
            record = await asyncio.to_thread(self.writer.get, entry.info.id)
        except StoreError:
            return
        if record is not None:
            entry.samples = listed_samples(record.state)
            entry.signal = signal_of(record.state)

    # --- lifecycle ---

    async def create(
        self,
        stream_id: str | None,
        model: str,
        adapter: str,
        config: dict[str, Any] | None,
        ttl_seconds: float | None,
        tenant: str = "",
        *,
        max_streams: int = 0,
        max_state_bytes: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> StreamEntry:
        """Register a new stream of ``tenant`` with a fresh state, persisted before this returns.

        ``stream_id`` is the tenant's name for it (its key is :func:`stream_key`). A stream
        beyond the tenant's quota (``max_streams``, ``max_state_bytes`` of its streams' states;
        0: none) is refused with QuotaExceededError before anything is stored. ``options`` are
        further fields of its record (the safety ones: ``auto_reset``, ``feedback``,
        ``snapshots``, ``frozen``).
        """
        public = validate_stream_id(stream_id) if stream_id is not None else new_stream_id()
        stream_id = stream_key(tenant, public)
        if stream_id in self.entries or stream_id in self._reserved:
            raise StreamExistsError(f"stream {public!r} already exists")
        streams, state_bytes = self.held(tenant)
        if max_streams and streams >= max_streams:
            raise QuotaExceededError(
                f"tenant {tenant!r} has {streams} streams, its quota: delete one first"
            )
        budget = max_state_bytes - state_bytes if max_state_bytes else None
        runtime = self.runtime(model)
        spec = get_adapter(adapter)
        validated = runtime.engine.validate_config(spec, config)
        options = dict(options or {})
        if options.get("snapshots", 0) > self.limits.max_snapshots:
            raise InvalidConfigError(
                f"snapshots: at most {self.limits.max_snapshots} per stream on this server "
                "(setting max_snapshots)"
            )
        info = StreamInfo(
            id=stream_id,
            model=model,
            adapter=spec.name,
            config=validated.model_dump(mode="json"),
            seed=-1,
            created_at=time.time(),
            ttl_seconds=ttl_seconds if ttl_seconds is not None else self.default_ttl_s,
            tenant=tenant,
            **options,
        )
        self._reserved.add(stream_id)
        try:
            try:
                opened = await runtime.call(self._open, runtime.slots, info, budget)
                await self._wait_store(opened.persisted, f"save stream {stream_id!r}")
            except StreamConflictError:
                # another replica created it meanwhile: its record stays, this slot goes
                await runtime.call(runtime.slots.close, stream_id)
                raise StreamExistsError(f"stream {public!r} already exists") from None
            except StoreUnavailableError:
                # Not created: free the slot, and make sure the unsaved record never appears.
                await runtime.call(runtime.slots.close, stream_id)
                self.writer.delete(stream_id)
                raise
            entry = self._new_entry(opened.info, state_bytes=opened.state_bytes)
            self.entries[stream_id] = entry
        finally:
            self._reserved.discard(stream_id)
        self._count(model)
        return entry

    @staticmethod
    def _open(slots: StreamSlots, info: StreamInfo, budget: int | None) -> _Opened:
        resident = slots.open(info)
        state_bytes = len(slots.export(resident))
        if budget is not None and state_bytes > budget:
            slots.close(info.id)
            raise QuotaExceededError(
                f"tenant {info.tenant!r} has {max(budget, 0)} bytes of its state-memory quota "
                f"left; a stream of {info.adapter} needs {state_bytes}: delete one first"
            )
        return _Opened(resident.info, slots.persist(resident), state_bytes)

    async def delete(self, stream_id: str) -> None:
        """Forget the stream: free its slot and delete its stored state; both, or neither.

        Done only once the store confirms the deletion. If it cannot (the store is down), the
        stream is put back as it was, its newest state included, and StoreUnavailableError
        (503) says so: the client retries, the stream never half-exists.
        """
        entry = await self.find(stream_id)
        runtime = self.runtime(entry.info.model)

        def discard(slots: StreamSlots) -> tuple[StreamRecord | None, int | None]:
            before = self._newest(slots, entry.info)
            resident = slots.resident.get(stream_id)
            token = resident.token if resident is not None and slots.leased else None
            slots.close(stream_id)
            return before, token

        del self.entries[stream_id]  # no new request finds it from here on (nor in the store)
        self._reserved.add(stream_id)
        try:
            try:
                before, token = await runtime.call(discard, runtime.slots)
            except StoreUnavailableError:
                self.entries.setdefault(stream_id, entry)
                raise
            try:
                await self._wait_store(
                    self.writer.delete(stream_id), f"delete stream {stream_id!r}"
                )
            except StoreUnavailableError:
                if before is not None:  # after the failed deletion: the store keeps the stream
                    self.writer.put(before, token)
                self.entries.setdefault(stream_id, entry)
                raise
        finally:
            self._reserved.discard(stream_id)
        self._count(entry.info.model)

    async def reset(self, stream_id: str) -> StreamEntry:
        """Give the stream its initial state back (same seed), without loading its old one.

        Under sync durability the reset stands only once stored: if the store fails, the stream
        is put back as it was and StoreUnavailableError (503) says so. Under interval
        durability it is written at the next flush, like every other change.
        """
        entry = await self.find(stream_id)

        def reset(slots: StreamSlots, resident: Resident) -> None:
            slots.engine.reset_stream(resident.handle)
            resident.samples, resident.signal = 0, None

        await self._replace(entry, reset, "save the reset state")
        entry.samples, entry.signal = 0, None
        return entry

    async def export_state(self, stream_id: str) -> bytes:
        """The stream's state as safetensors bytes (with JSON metadata)."""
        entry = await self.find(stream_id)
        runtime = self.runtime(entry.info.model)

        def export(slots: StreamSlots) -> bytes:
            return slots.export(slots.ensure(entry.info), requests=False)

        try:
            return await runtime.call(export, runtime.slots)
        except StreamConflictError:
            # Served by another replica: its last stored state (every acknowledged update,
            # under sync durability) is what this replica can read without taking it over.
            record = self._stored(stream_id)
            if record is None:
                raise
            return record.state

    def _stored(self, stream_id: str) -> StreamRecord | None:
        try:
            return self.writer.store.get(stream_id)
        except StoreError as error:
            raise store_failure(error, f"read stream {stream_id!r}") from None

    async def import_state(self, stream_id: str, data: bytes) -> StreamEntry:
        """Replace the stream's state by an exported one, checked against its model and adapter.

        The bytes are parsed and checked in a worker thread (bounded: header size, number of
        tensors, values); only the copy into the stream's slot runs on the engine thread, so a
        hostile file never holds up other streams. Store failures as for :meth:`reset`.
        """
        entry = await self.find(stream_id)
        runtime = self.runtime(entry.info.model)
        info = entry.info
        imported = await asyncio.to_thread(
            runtime.engine.parse_state, info.adapter, info.config, data
        )
        samples = samples_of(data)

        def load(slots: StreamSlots, resident: Resident) -> None:
            resident.handle = slots.engine.load_stream(resident.handle, imported)
            resident.info = replace(resident.info, seed=resident.handle.seed)
            resident.samples, resident.signal = samples, signal_of(data)

        resident = await self._replace(entry, load, "save the imported state")
        # The exporter's seed becomes the stream's: a later reset re-creates its initial state.
        entry.info, entry.samples, entry.signal = resident.info, samples, resident.signal
        entry.state_bytes = len(data)
        return entry

    async def _replace(
        self,
        entry: StreamEntry,
        change: Callable[[StreamSlots, Resident], None],
        action: str,
        load: bool = False,
    ) -> Resident:
        """Replace the stream's whole state with ``change`` on the engine thread; both or neither.

        Under sync durability the stream's newest record is kept first; if the store then
        fails to save the new state, the stream is restored to it (and it is written again).
        With ``load`` the stream's current state is loaded first (``change`` builds on it).
        """
        runtime = self.runtime(entry.info.model)

        def apply(slots: StreamSlots) -> tuple[Resident, StreamRecord | None, Future[None] | None]:
            before = self._newest(slots, entry.info) if self.sync else None
            claimed = entry.info.id not in slots.resident
            resident = slots.ensure(entry.info) if load else slots.claim(entry.info)
            try:
                change(slots, resident)
            except BaseException:
                if claimed:  # its fresh slot must not stand for the stored state
                    slots.close(entry.info.id)
                raise
            return resident, before, self._changed(slots, resident)

        resident, before, future = await runtime.call(apply, runtime.slots)
        try:
            await self._wait_store(future, action)
        except StoreUnavailableError:
            await runtime.call(runtime.slots.restore, entry.info, before)
            raise
        return resident

    @staticmethod
    def _newest(slots: StreamSlots, info: StreamInfo) -> StreamRecord | None:
        try:
            return slots.newest(info)
        except StoreError as error:
            raise store_failure(error, f"read stream {info.id!r}") from None

    # --- safety (docs/safety.md) ---

    async def set_frozen(self, stream_id: str, frozen: bool) -> StreamEntry:
        """Freeze (predict with the state, never update it) or thaw the stream; persisted."""
        entry = await self.find(stream_id)

        def change(slots: StreamSlots, resident: Resident) -> None:
            resident.info = replace(resident.info, frozen=frozen)

        resident = await self._replace(entry, change, "save the stream", load=True)
        entry.info = resident.info
        return entry

    async def roll_back(self, stream_id: str, samples: int | None) -> StreamEntry:
        """Give the stream a kept snapshot's state: the one at ``samples`` images, or the last.

        SnapshotNotFoundError (404) when the stream keeps no such snapshot. Store failures as
        for :meth:`reset`.
        """
        entry = await self.find(stream_id)

        def change(slots: StreamSlots, resident: Resident) -> None:
            kept = [s for s in resident.snapshots if samples is None or s.samples == samples]
            if not kept:
                which = "snapshot" if samples is None else f"snapshot at {samples} images"
                raise SnapshotNotFoundError(
                    f"stream {stream_id!r} keeps no {which}; see GET "
                    f"/v1/streams/{stream_id}/snapshots"
                )
            slots.roll_back(resident, kept[-1])
            resident.since_snapshot = 0
            resident.watch.baseline = None

        resident = await self._replace(entry, change, "save the rolled-back state", load=True)
        entry.samples, entry.signal = resident.samples, resident.signal
        return entry

    async def list_snapshots(self, stream_id: str) -> list[tuple[int, float]]:
        """The stream's kept snapshots, oldest first: (samples, unix time)."""
        entry = await self.find(stream_id, touch=False)
        runtime = self.runtime(entry.info.model)

        def snapshots(slots: StreamSlots) -> list[tuple[int, float]]:
            resident = slots.resident.get(stream_id)
            if resident is None or resident.info.created_at != entry.info.created_at:
                return []  # not resident: its snapshots (kept in memory) went with its slot
            return [(s.samples, s.taken_at) for s in resident.snapshots]

        entry.snapshots = await runtime.call(snapshots, runtime.slots)
        return entry.snapshots

    async def fork(
        self,
        stream_id: str,
        new_id: str | None,
        options: Mapping[str, Any],
        tenant: str = "",
        *,
        max_streams: int = 0,
        max_state_bytes: int = 0,
    ) -> StreamEntry:
        """A new stream of ``tenant`` with a copy of the stream's state (same model, adapter
        and config), within the tenant's quota (see :meth:`create`).

        ``options`` override the copy's record fields (``ttl_seconds`` and the safety fields);
        the rest are the original's. If the copy cannot be stored, the new stream is deleted.
        """
        entry = await self.find(stream_id)
        info = entry.info
        state = await self.export_state(stream_id)
        fields = {
            name: getattr(info, name) for name in ("auto_reset", "feedback", "snapshots", "frozen")
        }
        ttl = options.get("ttl_seconds", info.ttl_seconds)
        fields.update({k: v for k, v in options.items() if k != "ttl_seconds"})
        fork = await self.create(
            new_id,
            info.model,
            info.adapter,
            info.config,
            ttl,
            tenant,
            max_streams=max_streams,
            max_state_bytes=max_state_bytes,
            options=fields,
        )
        try:
            return await self.import_state(fork.info.id, state)
        except BaseException:
            with contextlib.suppress(ServiceError):
                await self.delete(fork.info.id)
            raise

    async def drift(self, stream_id: str) -> dict[str, Any]:
        """The stream's full drift report."""
        entry = await self.find(stream_id)
        runtime = self.runtime(entry.info.model)

        def drift(slots: StreamSlots) -> dict[str, Any]:
            return slots.engine.drift(slots.ensure(entry.info).handle)

        return await runtime.call(drift, runtime.slots)

    def _changed(self, slots: StreamSlots, resident: Resident) -> Future[None] | None:
        """Mark a changed stream: persisted now under sync durability, else at the next flush."""
        resident.dirty = True
        return slots.persist(resident) if self.sync else None

    async def _wait_store(self, future: Future[None] | None, action: str) -> None:
        if future is None:
            return
        try:
            await asyncio.wrap_future(future)
        except StoreError as error:
            raise store_failure(error, action) from None

    # --- start-up, expiry, flush ---

    def restore(self) -> int:
        """Register every stored stream of a served model (loaded into a slot on first use)."""
        count = 0
        for record in self.writer.store.load_all():
            if record.model not in self.runtimes:
                logger.warning(
                    "stream %s is for model %s, which is not served: left in the store",
                    record.id,
                    record.model,
                )
                continue
            if not STREAM_KEY.fullmatch(record.id) or tenant_of(record.id) != record.tenant:
                logger.warning("stored stream id %r is invalid: skipped", record.id)
                continue
            self.entries[record.id] = self._entry(record)
            count += 1
        for model in self.runtimes:
            self._count(model)
        return count

    async def expire(self) -> list[str]:
        """Delete the streams idle for longer than their TTL."""
        now = self.clock()
        expired = [
            sid
            for sid, entry in self.entries.items()
            if entry.info.ttl_seconds is not None and now - entry.last_used > entry.info.ttl_seconds
        ]
        for stream_id in expired:
            model = self.entries[stream_id].info.model
            try:
                await self.delete(stream_id)
            except (StreamNotFoundError, StoreUnavailableError) as error:
                logger.warning("expiring stream %s: %s", stream_id, error)
                continue
            self.metrics.streams_expired.labels(model).inc()
            logger.info("stream %s expired", stream_id)
        return expired

    async def flush(self) -> None:
        """Persist every changed stream of every model, and retry failed writes."""
        futures: list[Future[None]] = list(self.writer.retry_failed())
        for runtime in self.runtimes.values():
            futures += await runtime.call(runtime.slots.flush)
        for future in futures:
            try:
                await asyncio.wrap_future(future)
            except StoreError as error:
                logger.warning("flush: %s", error)
                if isinstance(error, StoreConflictError) and error.stream_id in self.entries:
                    # the updates are lost: list the stream with what the store holds
                    await self.refresh(self.entries[error.stream_id])

    def _count(self, model: str) -> None:
        count = sum(1 for e in self.entries.values() if e.info.model == model)
        self.metrics.streams.labels(model).set(count)


@dataclass(frozen=True)
class _Opened:
    info: StreamInfo
    persisted: Future[None]
    state_bytes: int
