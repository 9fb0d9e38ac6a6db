"""Stream state stores: where a stream's record (metadata + opaque state bytes) persists.

Three backends share one contract (`StateStore`):

- `MemoryStore`: a dict in this process; nothing survives a restart (tests, ephemeral servers).
- `LocalStore`: one file per stream in a directory, written atomically (temp file, fsync,
  rename, fsync of the directory); the embedded default. Its directory belongs to one server
  process, which removes the temp files a crash left behind when it opens the store.
- `RedisStore`: one Redis hash per stream, for several replicas (and Redis Cluster). Its writes
  are fenced and versioned (see `RedisStore` and docs/scaling.md): a stream has one owner at a
  time (a lease with a TTL and a fencing token), and a write derived from an older version, or
  made with an older token, fails with `StoreConflictError` instead of overwriting newer state.

Every backend failure (I/O, Redis connection, a corrupt entry read by `get`) is raised as
`StoreError`. The stores never interpret `state`; it is the engine's safetensors blob, stored
byte for byte. Nothing is pickled: a record is a JSON header plus the raw state bytes.

On-disk/in-Redis encoding of a record (`encode_record` / `decode_record`)::

    MAGIC (8 bytes, b"TTASTRM" + format version byte 0x01)
    header length (4 bytes, unsigned big-endian)
    header (UTF-8 JSON object: every field of `StreamInfo`, plus state_length, state_sha256)
    state (state_length raw bytes; must hash to state_sha256)

`LocalStore` writes exactly that to `<sha256(id) hex>.stream`; `RedisStore` keeps the header JSON
in the hash field `meta` and the raw state in the field `state`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import pydantic
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

MAGIC = b"TTASTRM\x01"
"""The first bytes of every local stream file: b"TTASTRM" and the format version (1)."""

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A header longer than this is refused on write and treated as corruption on read."""

STREAM_FILE_SUFFIX = ".stream"
_TEMP_PREFIX = ".tmp-"
_LENGTH = struct.Struct(">I")
_STREAM_FILE = re.compile(r"^[0-9a-f]{64}\.stream$")
_REDIS_SCAN_CHUNK = 256

StoreKind = Literal["memory", "local", "redis"]
STORE_KINDS: tuple[StoreKind, ...] = ("memory", "local", "redis")


class StoreError(Exception):
    """A state store failed: I/O, a lost Redis connection, a corrupt entry, a closed store."""


class StoreConflictError(StoreError):
    """A fenced write or a lease lost to another replica: the caller's copy of the stream is stale.

    ``stream_id`` is the stream; ``retry_after_s`` is when retrying may succeed (the other
    owner's lease left, or 1 s).
    """

    def __init__(self, message: str, stream_id: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.retry_after_s = retry_after_s


class CorruptRecordError(StoreError):
    """A stored entry exists but cannot be decoded (truncated, bad magic, checksum mismatch)."""


@dataclass(frozen=True)
class StreamInfo:
    """What a stream is: everything persisted about it except its state.

    The one definition of a stream's record: the stores write and read every field generically
    (the JSON header), and the API's view (``service.schemas.StreamPublic``) derives from it, so a
    new field is one edit here. A new field needs a default, so that older records still load.
    """

    id: Annotated[
        str,
        pydantic.Field(description="the stream's id (in the store: '<tenant>/<id>' with a tenant)"),
    ]
    model: str
    adapter: str
    config: dict[str, Any]
    seed: int
    created_at: Annotated[float, pydantic.Field(description="Unix time of creation")]
    ttl_seconds: Annotated[
        float | None, pydantic.Field(description="deleted after this long idle, in seconds")
    ]
    tenant: Annotated[str, pydantic.Field(description="the tenant that owns the stream")] = ""
    # Stream safety (docs/safety.md).
    auto_reset: Annotated[
        dict[str, Any] | None,
        pydantic.Field(description="auto-reset policy (service.safety.AutoResetPolicy); null: off"),
    ] = None
    feedback: Annotated[
        bool, pydantic.Field(description="keep live accuracy from label feedback")
    ] = False
    snapshots: Annotated[
        int, pydantic.Field(ge=0, description="good states kept for rollback (0: none)")
    ] = 0
    frozen: Annotated[bool, pydantic.Field(description="predict without updating the state")] = (
        False
    )

    def record(self, state: bytes) -> StreamRecord:
        """The store record of this stream with ``state``."""
        return StreamRecord(**self.fields(), state=state)

    def fields(self) -> dict[str, Any]:
        """The info's fields by name (``config`` copied; a record's state and version left out)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(StreamInfo)}
        return {**values, "config": dict(self.config)}

    @classmethod
    def of(cls, record: StreamInfo) -> StreamInfo:
        """The info of a stored record (its config copied)."""
        return cls(**record.fields())


@dataclass(frozen=True, kw_only=True)
class StreamRecord(StreamInfo):
    """Everything persisted about one stream: its identity, settings and opaque state bytes."""

    state: bytes
    version: int = 0
    """The record's version in a versioned store (Redis): 1 for a new stream's first write, +1
    per write; a fenced write of version n fails over a stored version >= n. 0 elsewhere."""


@dataclass(frozen=True, kw_only=True)
class StoredHeader(StreamInfo):
    """The JSON header of a stored record: the stream's info, its state's length and sha256."""

    state_length: Annotated[int, pydantic.Field(ge=0)]
    state_sha256: str


# Strict: a JSON true is no seed, "1" no time; ints are accepted as floats (times, TTLs).
_HEADER = pydantic.TypeAdapter(StoredHeader)


@dataclass(frozen=True)
class Lease:
    """A replica's ownership of a stream: its fencing token and the stored version it found."""

    token: int
    version: int


NO_LEASE = Lease(token=0, version=0)
"""What the single-process stores (memory, local directory) grant: ownership is implicit."""


@runtime_checkable
class StateStore(Protocol):
    """Persistence of stream records; synchronous and safe to call from several threads."""

    lease_ttl_s: float | None
    """How long a lease lasts; None for stores of one process, which need no leases."""

    def put(self, record: StreamRecord, token: int | None = None) -> None:
        """Store `record`, replacing any record with the same id; durable when it returns.

        With a ``token`` (a lease's), a versioned store writes only if the token is still the
        stream's newest and the stored version is below ``record.version``, else raises
        StoreConflictError.
        """
        ...

    def acquire(self, stream_id: str) -> Lease:
        """Take or renew this replica's lease; StoreConflictError while another one owns it."""
        ...

    def release(self, stream_id: str, token: int) -> None:
        """Give up the lease of ``token`` (if still this replica's): others may take over now."""
        ...

    def get(self, stream_id: str) -> StreamRecord | None:
        """The record of `stream_id`, or None if absent; StoreError if it is corrupt."""
        ...

    def delete(self, stream_id: str) -> None:
        """Remove the record of `stream_id`; no error if it is absent."""
        ...

    def ids(self) -> list[str]:
        """The ids of all stored streams, sorted."""
        ...

    def load_all(self) -> Iterator[StreamRecord]:
        """Every stored record, sorted by id, skipping (and logging) corrupt entries."""
        ...

    def ping(self) -> None:
        """Return if the store can be used now (cheap: for readiness probes), else StoreError."""
        ...

    def close(self) -> None:
        """Release resources; later calls raise StoreError. Idempotent."""
        ...


# --- encoding ------------------------------------------------------------------------------


def encode_header(record: StreamRecord) -> bytes:
    """The record's UTF-8 JSON header: its `StreamInfo` fields, its state's length and sha256."""
    header = {
        **record.fields(),
        "state_length": len(record.state),
        "state_sha256": hashlib.sha256(record.state).hexdigest(),
    }
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and other readers would reject them
        text = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"stream {record.id!r}: record is not JSON-serializable: {exc}") from exc
    data = text.encode("utf-8")
    if len(data) > MAX_HEADER_BYTES:
        raise StoreError(
            f"stream {record.id!r}: header is {len(data)} bytes, over {MAX_HEADER_BYTES}"
        )
    return data


def encode_record(record: StreamRecord) -> bytes:
    """The full binary form of `record`: magic, header length, JSON header, raw state."""
    header = encode_header(record)
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, record.state))


def decode_header(data: bytes) -> StoredHeader:
    """Parse and type-check a JSON header; CorruptRecordError if it is not a valid one."""
    try:
        return _HEADER.validate_json(data, strict=True)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise CorruptRecordError(f"header is not UTF-8 JSON: {error['msg']}") from None
        if not error["loc"]:
            raise CorruptRecordError("header is not a JSON object") from None
        raise CorruptRecordError(
            f"header field {error['loc'][0]!r} is missing or has the wrong type ({error['msg']})"
        ) from None


def record_from_parts(header: StoredHeader, state: bytes) -> StreamRecord:
    """Build a record from a decoded header and the state bytes, checking length and sha256."""
    if len(state) != header.state_length:
        raise CorruptRecordError(
            f"state is {len(state)} bytes, the header says {header.state_length} (truncated?)"
        )
    if hashlib.sha256(state).hexdigest() != header.state_sha256:
        raise CorruptRecordError("state bytes do not match the sha256 in the header")
    return header.record(state)


def _header_length(prefix: bytes) -> int:
    """Check the magic in the fixed prefix (magic + length) and return the header length."""
    if len(prefix) < len(MAGIC) + _LENGTH.size:
        raise CorruptRecordError(f"only {len(prefix)} bytes, shorter than the fixed prefix")
    if prefix[: len(MAGIC)] != MAGIC:
        raise CorruptRecordError(
            "bad magic bytes (not a tta-serve stream file, or another version)"
        )
    (length,) = _LENGTH.unpack_from(prefix, len(MAGIC))
    if length > MAX_HEADER_BYTES:
        raise CorruptRecordError(f"header length {length} is over {MAX_HEADER_BYTES}")
    return int(length)


def decode_record(data: bytes) -> StreamRecord:
    """Parse the binary form written by `encode_record`; CorruptRecordError if it is invalid."""
    start = len(MAGIC) + _LENGTH.size
    end = start + _header_length(data[:start])
    if len(data) < end:
        raise CorruptRecordError("truncated inside the header")
    return record_from_parts(decode_header(data[start:end]), data[end:])


# --- memory --------------------------------------------------------------------------------


class MemoryStore:
    """Records in a dict of this process; nothing persists. For tests and ephemeral servers.

    Records are kept encoded, so a record is JSON-checked on `put` exactly as in the other
    backends and a caller mutating `config` afterwards does not change what is stored.
    """

    lease_ttl_s: float | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[bytes, bytes]] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("memory store is closed")

    def put(self, record: StreamRecord, token: int | None = None) -> None:
        """Store `record`, replacing any record with the same id (one process: no fencing)."""
        header = encode_header(record)
        with self._lock:
            self._check_open()
            self._entries[record.id] = (header, record.state)

    def get(self, stream_id: str) -> StreamRecord | None:
        """The record of `stream_id`, or None if absent."""
        with self._lock:
            self._check_open()
            entry = self._entries.get(stream_id)
        if entry is None:
            return None
        return record_from_parts(decode_header(entry[0]), entry[1])

    def delete(self, stream_id: str) -> None:
        """Remove the record of `stream_id`; no error if it is absent."""
        with self._lock:
            self._check_open()
            self._entries.pop(stream_id, None)

    def ids(self) -> list[str]:
        """The ids of all stored streams, sorted."""
        with self._lock:
            self._check_open()
            return sorted(self._entries)

    def load_all(self) -> Iterator[StreamRecord]:
        """Every stored record, sorted by id (a snapshot taken when iteration starts)."""
        with self._lock:
            self._check_open()
            snapshot = sorted(self._entries.items())
        for _, (header, state) in snapshot:
            yield record_from_parts(decode_header(header), state)

    def acquire(self, stream_id: str) -> Lease:
        """Ownership is implicit in one process."""
        return NO_LEASE

    def release(self, stream_id: str, token: int) -> None:
        """Nothing to release in one process."""

    def ping(self) -> None:
        """StoreError once the store is closed."""
        with self._lock:
            self._check_open()

    def close(self) -> None:
        """Drop every record; later calls raise StoreError."""
        with self._lock:
            self._closed = True
            self._entries.clear()


# --- local directory -----------------------------------------------------------------------


def stream_file_name(stream_id: str) -> str:
    """The file name of a stream in a LocalStore: sha256 of the UTF-8 id, hex, plus `.stream`.

    Derived by hashing, never from the id's characters, so no id can name a path outside the
    store's directory (`../x`, `/etc/passwd`, NUL bytes, reserved names).
    """
    return hashlib.sha256(stream_id.encode("utf-8")).hexdigest() + STREAM_FILE_SUFFIX


def _fsync_directory(directory: Path) -> None:
    """fsync a directory so that a rename or unlink inside it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """One file per stream in `directory`, each written atomically; the embedded default store.

    A write goes to a temp file in the same directory, is flushed and fsynced, renamed over the
    stream's file (`os.replace`, atomic on POSIX), and the directory is fsynced: a crash leaves
    either the old or the new record, never a torn one. Leftover temp files (a crash between
    create and rename) are ignored by `ids` and `load_all`, and removed by `remove_temp_files`,
    which the server calls when it opens its store.

    Args:
        directory: where the stream files live.
        create: create `directory` (and its parents) if missing; with False a missing
            directory is a StoreError.

    Example:
        >>> store = LocalStore(Path("/var/lib/tta-serve/streams"))  # doctest: +SKIP
        >>> store.put(record)  # doctest: +SKIP
    """

    lease_ttl_s: float | None = None  # the directory belongs to one process: ownership is implicit

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        self.directory = Path(directory)
        self._closed = False
        try:
            if create:
                self.directory.mkdir(parents=True, exist_ok=True)
            if not self.directory.is_dir():
                raise StoreError(f"state directory {self.directory} does not exist")
            # fail at start-up rather than at the first write if the directory is not writable
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=_TEMP_PREFIX)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"state directory {self.directory} is not usable: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"local store at {self.directory} is closed")

    def remove_temp_files(self) -> int:
        """Remove every temp file in the directory; return how many were removed.

        Only for the directory's owner at start-up: a temp file is a write in progress, so
        while no write is in progress every one of them is the leftover of a crash.
        """
        self._check_open()
        removed = 0
        try:
            for name in os.listdir(self.directory):
                if name.startswith(_TEMP_PREFIX):
                    (self.directory / name).unlink(missing_ok=True)
                    removed += 1
        except OSError as exc:
            raise StoreError(f"cannot remove temp files in {self.directory}: {exc}") from exc
        return removed

    def path_for(self, stream_id: str) -> Path:
        """The file that holds (or would hold) the record of `stream_id`."""
        return self.directory / stream_file_name(stream_id)

    def put(self, record: StreamRecord, token: int | None = None) -> None:
        """Write `record` atomically and durably (fsync of file and directory) before returning."""
        self._check_open()
        data = encode_record(record)
        path = self.path_for(record.id)
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_TEMP_PREFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_directory(self.directory)
        except OSError as exc:
            raise StoreError(f"cannot write stream {record.id!r} to {path}: {exc}") from exc
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    logger.warning("could not remove temp file %s", tmp)

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def _decode_file(self, path: Path, data: bytes) -> StreamRecord:
        record = decode_record(data)
        # the name is the hash of the id: a file copied or renamed from another stream is caught
        if stream_file_name(record.id) != path.name:
            raise CorruptRecordError(f"file name does not match the stored id {record.id!r}")
        return record

    def get(self, stream_id: str) -> StreamRecord | None:
        """The record of `stream_id`, None if absent, StoreError if its file is corrupt."""
        self._check_open()
        path = self.path_for(stream_id)
        data = self._read(path)
        if data is None:
            return None
        try:
            return self._decode_file(path, data)
        except CorruptRecordError as exc:
            raise CorruptRecordError(f"stream {stream_id!r} in {path} is corrupt: {exc}") from exc

    def delete(self, stream_id: str) -> None:
        """Remove the stream's file (and fsync the directory); no error if it is absent."""
        self._check_open()
        path = self.path_for(stream_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete stream {stream_id!r} at {path}: {exc}") from exc
        try:
            _fsync_directory(self.directory)
        except OSError as exc:
            raise StoreError(f"cannot fsync {self.directory}: {exc}") from exc

    def _stream_files(self) -> list[Path]:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise StoreError(f"cannot list state directory {self.directory}: {exc}") from exc
        return [self.directory / name for name in sorted(names) if _STREAM_FILE.match(name)]

    def _read_header(self, path: Path) -> StoredHeader | None:
        """Only the JSON header of a stream file, checked against the file's name and size.

        Lets `ids()` list streams without reading every state blob; None if the file vanished.
        """
        try:
            with path.open("rb") as f:
                prefix = f.read(len(MAGIC) + _LENGTH.size)
                length = _header_length(prefix)
                header_bytes = f.read(length)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        if len(header_bytes) != length:
            raise CorruptRecordError("truncated inside the header")
        header = decode_header(header_bytes)
        if stream_file_name(header.id) != path.name:
            raise CorruptRecordError(f"file name does not match the stored id {header.id!r}")
        expected = len(prefix) + length + header.state_length
        if size != expected:
            raise CorruptRecordError(
                f"file is {size} bytes, the header says {expected} (truncated?)"
            )
        return header

    def _scan(self) -> list[tuple[str, Path]]:
        """(id, path) of every stream file whose header is valid, sorted by id."""
        found = []
        for path in self._stream_files():
            try:
                header = self._read_header(path)
            except StoreError as exc:
                logger.warning("skipping stream file %s: %s", path, exc)
                continue
            if header is not None:
                found.append((header.id, path))
        return sorted(found)

    def ids(self) -> list[str]:
        """The ids of all stream files with a valid header, sorted; corrupt ones are logged.

        Reads headers only: a file whose state bytes are damaged but of the right length is
        listed here, and skipped by `load_all` (which verifies the state's sha256).
        """
        self._check_open()
        return [stream_id for stream_id, _ in self._scan()]

    def load_all(self) -> Iterator[StreamRecord]:
        """Every readable record, sorted by id; corrupt or unreadable files are logged, skipped.

        Files are read one at a time as the iterator advances, so memory holds one state.
        """
        self._check_open()
        for _, path in self._scan():
            try:
                data = self._read(path)
                record = None if data is None else self._decode_file(path, data)
            except StoreError as exc:
                logger.warning("skipping stream file %s: %s", path, exc)
                continue
            if record is not None:  # None: deleted since the scan
                yield record

    def acquire(self, stream_id: str) -> Lease:
        """Ownership is implicit: the directory belongs to one process."""
        return NO_LEASE

    def release(self, stream_id: str, token: int) -> None:
        """Nothing to release in one process."""

    def ping(self) -> None:
        """StoreError if the store is closed or its directory is gone or not writable."""
        self._check_open()
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StoreError(f"state directory {self.directory} is missing or not writable")

    def close(self) -> None:
        """Mark the store closed (every write is already durable); later calls raise."""
        self._closed = True


# --- redis ---------------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def redact_url(url: str) -> str:
    """`url` without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unparsable redis url>"
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


# Lease of a stream: KEYS lease, fence counter, stream hash; ARGV replica, ttl (ms).
# The owner renews its lease and keeps its token; a free stream gets the next token (INCR of a
# counter that is never reset, so tokens only grow); a stream owned by another is refused with
# the lease's remaining time and owner. Returns {1, token, stored version} or {0, pttl, owner}.
_ACQUIRE = """
local lease = redis.call('GET', KEYS[1])
local version = tonumber(redis.call('HGET', KEYS[3], 'version') or '0')
if lease then
  local owner, token = string.match(lease, '^(.*) (%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(token), version}
  end
  return {0, redis.call('PTTL', KEYS[1]), owner}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return {1, token, version}
"""

# Fenced, versioned write: KEYS stream hash, fence counter; ARGV token, new version, meta,
# state. Written only if the token is the newest one granted for the stream and the
# store has not moved past the version the record was derived from (stored < new: a write
# retried after an outage may carry several versions at once). A retry of a write that was applied
# (same version, same token: only this owner writes with it) succeeds again.
# Returns {1} or {0, reason, stored value}.
_PUT = """
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = tonumber(ARGV[1])
local new = tonumber(ARGV[2])
if version == new and tonumber(redis.call('HGET', KEYS[1], 'token') or '-1') == token then
  return {1}
end
if token ~= fence then return {0, 'fenced', fence} end
if version >= new then return {0, 'version', version} end
redis.call('HSET', KEYS[1], 'meta', ARGV[3], 'state', ARGV[4], 'version', new, 'token', token)
return {1}
"""

# Release: KEYS lease; ARGV "replica token". Deleted only if it is still that lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """One Redis hash per stream (`<prefix>stream:{<id>}`, fields `meta`, `state`, `version`).

    Every key of a stream carries the id as its hash tag (`{<id>}`): the stream's hash, lease and
    fence counter live in one Redis Cluster slot, so each operation (a Lua script included) stays
    on one shard, and streams spread over the shards by id. There is no global key: the ids are
    listed by SCAN over the hashes (on every primary of a cluster), so no single key grows with
    the number of streams. A put is one HSET or one script, atomic either way, so readers never
    see a half-written stream; both are idempotent, so redis-py's retry after a dropped
    connection is safe. Durability across a Redis restart is Redis's own (AOF/RDB settings): `put`
    returns once Redis has applied the write.

    Ownership (docs/scaling.md): `acquire` gives this replica (``replica_id``) a lease on a
    stream, `<prefix>lease:{<id>}` = "<replica> <token>" with a TTL, refused while another
    replica's lease lives; tokens come from `<prefix>fence:{<id>}`, which only grows. A put with
    a token is one Lua script: it writes only if the token is the newest granted and the hash's
    `version` field is below the record's, so a replica that was paused, partitioned or
    adapted from a stale copy gets StoreConflictError and never overwrites newer state.

    Args:
        url: a redis-py URL, e.g. `redis://127.0.0.1:6379/0` (passwords never appear in errors);
            with ``cluster``, the address of any node of the cluster.
        prefix: namespace of every key, so several deployments can share one Redis.
        cluster: connect with redis-py's cluster client (Redis Cluster).
        socket_timeout: seconds for connecting and for each command; short, so that a dead
            Redis becomes a StoreError quickly instead of blocking the worker thread.
        retries: retries of a command after a connection error or timeout.

    Raises StoreError at construction if Redis does not answer PING.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "tta:",
        *,
        socket_timeout: float = 2.0,
        retries: int = 1,
        replica_id: str = "replica",
        lease_ttl_s: float = 10.0,
        cluster: bool = False,
    ) -> None:
        if not replica_id or any(c.isspace() for c in replica_id):
            raise ValueError(f"replica id {replica_id!r} must be non-empty, without spaces")
        self.prefix = prefix
        self.replica_id = replica_id
        self.lease_ttl_s: float | None = lease_ttl_s
        self._url = redact_url(url)
        self._closed = False
        client_class = redis.RedisCluster if cluster else redis.Redis
        try:
            self._client: redis.Redis | redis.RedisCluster = client_class.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
                decode_responses=False,
            )
            self._client.ping()
        except (redis.RedisError, ValueError) as exc:
            raise StoreError(f"Redis at {self._url} is not reachable: {exc}") from exc
        self._acquire = self._client.register_script(_ACQUIRE)
        self._put = self._client.register_script(_PUT)
        self._release = self._client.register_script(_RELEASE)
        if not cluster:
            self._migrate_id_set()

    def _key(self, stream_id: str) -> str:
        return f"{self.prefix}stream:{{{stream_id}}}"

    def _id_of(self, key: bytes) -> str | None:
        """The stream id of a hash key found by SCAN (None if it is not one of ours)."""
        head = f"{self.prefix}stream:{{".encode()
        if not (key.startswith(head) and key.endswith(b"}")):
            return None
        try:
            return key[len(head) : -1].decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("skipping Redis key %r: its stream id is not UTF-8", key)
            return None

    def _migrate_id_set(self) -> None:
        """Move streams written by releases before hash tags (`<prefix>stream:<id>` + an id set).

        Each old key is renamed to its tagged name (the fence counter too: tokens never go
        back); concurrent start-ups are safe, as RENAMENX of a key already moved fails. Cluster
        deployments never had the old layout (its multi-key writes could not run there).
        """
        old_ids = f"{self.prefix}ids"
        try:
            members = self._client.smembers(old_ids)
            for member in members:
                stream_id = member.decode(errors="replace") if isinstance(member, bytes) else member
                for kind in ("stream", "fence"):
                    old, new = (
                        f"{self.prefix}{kind}:{stream_id}",
                        f"{self.prefix}{kind}:{{{stream_id}}}",
                    )
                    with contextlib.suppress(redis.ResponseError):  # gone: moved by another
                        self._client.renamenx(old, new)
            if members:
                logger.info("moved %d Redis streams to hash-tagged keys", len(members))
            self._client.delete(old_ids)
        except redis.RedisError as exc:
            raise StoreError(
                f"Redis at {self._url}: cannot move streams to hash-tagged keys: {exc}"
            ) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"Redis store at {self._url} is closed")

    def _error(self, action: str, exc: Exception) -> StoreError:
        return StoreError(f"Redis at {self._url}: cannot {action}: {exc}")

    def _decode(self, stream_id: str, fields: Mapping[Any, Any]) -> StreamRecord:
        meta, state = fields.get(b"meta"), fields.get(b"state")
        if not isinstance(meta, bytes) or not isinstance(state, bytes):
            raise CorruptRecordError(
                f"stream {stream_id!r}: hash lacks the 'meta' or 'state' field"
            )
        try:
            record = record_from_parts(decode_header(meta), state)
        except CorruptRecordError as exc:
            raise CorruptRecordError(f"stream {stream_id!r} is corrupt: {exc}") from exc
        if record.id != stream_id:
            raise CorruptRecordError(f"stream {stream_id!r}: hash holds id {record.id!r}")
        try:
            version = int(fields.get(b"version") or 0)
        except ValueError:
            raise CorruptRecordError(f"stream {stream_id!r}: version is not an integer") from None
        return dataclasses.replace(record, version=version)

    def _lease_key(self, stream_id: str) -> str:
        return f"{self.prefix}lease:{{{stream_id}}}"

    def _fence_key(self, stream_id: str) -> str:
        return f"{self.prefix}fence:{{{stream_id}}}"

    def acquire(self, stream_id: str) -> Lease:
        """Take or renew this replica's lease; StoreConflictError while another replica owns it."""
        self._check_open()
        ttl_ms = max(1, round((self.lease_ttl_s or 0) * 1000))
        keys = [self._lease_key(stream_id), self._fence_key(stream_id), self._key(stream_id)]
        try:
            result = self._acquire(keys=keys, args=[self.replica_id, ttl_ms])
        except redis.RedisError as exc:
            raise self._error(f"lease stream {stream_id!r}", exc) from exc
        if result[0] != 1:
            owner = result[2].decode() if isinstance(result[2], bytes) else result[2]
            wait = max(int(result[1]), 0) / 1000
            raise StoreConflictError(
                f"stream {stream_id!r} is served by replica {owner} for {wait:.1f} s more",
                stream_id,
                retry_after_s=max(wait, 1.0),
            )
        return Lease(token=int(result[1]), version=int(result[2]))

    def release(self, stream_id: str, token: int) -> None:
        """Delete this replica's lease of ``token``, if it is still the stream's lease."""
        self._check_open()
        try:
            self._release(keys=[self._lease_key(stream_id)], args=[f"{self.replica_id} {token}"])
        except redis.RedisError as exc:
            raise self._error(f"release stream {stream_id!r}", exc) from exc

    def put(self, record: StreamRecord, token: int | None = None) -> None:
        """Write the stream's hash: fenced by ``token`` if given, else unconditionally.

        The unconditional form (tools, tests, a single replica) sets the version to the
        record's. StoreConflictError if a fenced write finds a newer token or version.
        """
        self._check_open()
        meta = encode_header(record)
        if token is not None:
            self._put_fenced(record, meta, token)
            return
        try:
            self._client.hset(
                self._key(record.id),
                mapping={"meta": meta, "state": record.state, "version": record.version},
            )
        except redis.RedisError as exc:
            raise self._error(f"write stream {record.id!r}", exc) from exc

    def _put_fenced(self, record: StreamRecord, meta: bytes, token: int) -> None:
        keys = [self._key(record.id), self._fence_key(record.id)]
        args: list[bytes | str | int] = [token, record.version, meta, record.state]
        try:
            result = self._put(keys=keys, args=args)
        except redis.RedisError as exc:
            raise self._error(f"write stream {record.id!r}", exc) from exc
        if result[0] != 1:
            reason = result[1].decode() if isinstance(result[1], bytes) else result[1]
            raise StoreConflictError(
                f"stream {record.id!r} moved on in the store ({reason}: found {result[2]}, "
                f"wrote version {record.version} with token {token}): this copy was stale",
                record.id,
            )

    def get(self, stream_id: str) -> StreamRecord | None:
        """The record of `stream_id`, None if absent, StoreError if its hash is corrupt."""
        self._check_open()
        try:
            fields = self._client.hgetall(self._key(stream_id))
        except redis.RedisError as exc:
            raise self._error(f"read stream {stream_id!r}", exc) from exc
        if not fields:
            return None
        return self._decode(stream_id, fields)

    def delete(self, stream_id: str) -> None:
        """Delete the stream's hash; no error if absent. Its fence counter stays (tokens grow)."""
        self._check_open()
        try:
            self._client.delete(self._key(stream_id))
        except redis.RedisError as exc:
            raise self._error(f"delete stream {stream_id!r}", exc) from exc

    def ids(self) -> list[str]:
        """The ids of the stored streams, sorted (a SCAN of this prefix's stream hashes)."""
        self._check_open()
        pattern = _glob_escape(self.prefix) + "stream:{*}"
        try:
            keys = self._client.scan_iter(match=pattern, count=1000, _type="HASH")
            return sorted(i for i in map(self._id_of, keys) if i is not None)
        except redis.RedisError as exc:
            raise self._error("list stream ids", exc) from exc

    def load_all(self) -> Iterator[StreamRecord]:
        """Every stored record, sorted by id, fetched in pipelined chunks.

        Corrupt hashes, and hashes deleted while listing, are logged and skipped.
        """
        ids = self.ids()
        for start in range(0, len(ids), _REDIS_SCAN_CHUNK):
            chunk = ids[start : start + _REDIS_SCAN_CHUNK]
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for stream_id in chunk:
                        pipe.hgetall(self._key(stream_id))
                    results = pipe.execute()
            except redis.RedisError as exc:
                raise self._error("read streams", exc) from exc
            for stream_id, fields in zip(chunk, results, strict=True):
                if not fields:
                    logger.warning("skipping stream %r: deleted while loading", stream_id)
                    continue
                try:
                    yield self._decode(stream_id, fields)
                except CorruptRecordError as exc:
                    logger.warning("skipping Redis stream: %s", exc)

    def ping(self) -> None:
        """StoreError if the store is closed or Redis does not answer PING."""
        self._check_open()
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise self._error("ping", exc) from exc

    def close(self) -> None:
        """Close the connection pool; later calls raise StoreError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
        except redis.RedisError as exc:
            raise self._error("close the connection", exc) from exc


# --- factory -------------------------------------------------------------------------------


def create_store(
    kind: StoreKind,
    *,
    directory: Path | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "tta:",
    replica_id: str = "replica",
    lease_ttl_s: float = 10.0,
    redis_cluster: bool = False,
) -> StateStore:
    """Create a state store by name.

    Args:
        kind: "memory", "local" or "redis".
        directory: the state directory (required for "local"; created if missing).
        redis_url: the Redis URL (required for "redis").
        redis_prefix: key namespace of the Redis store.
        replica_id: this replica's name in the Redis store's leases.
        lease_ttl_s: how long a Redis lease lasts without renewal.
        redis_cluster: ``redis_url`` is a node of a Redis Cluster.

    The caller owns the store: a local store's leftover temp files (from a crash) are removed.

    Raises ValueError for an unknown kind or a missing argument, StoreError if the backend is
    not usable (directory not writable, Redis not reachable).

    Example:
        >>> store = create_store("local", directory=Path("data/streams"))  # doctest: +SKIP
    """
    if kind == "memory":
        return MemoryStore()
    if kind == "local":
        if directory is None:
            raise ValueError("the local state store needs a directory")
        store = LocalStore(directory)
        removed = store.remove_temp_files()  # the caller is the directory's one owner
        if removed:
            logger.warning("removed %d temp files left in %s by a crash", removed, directory)
        return store
    if kind == "redis":
        if not redis_url:
            raise ValueError("the redis state store needs a redis_url")
        return RedisStore(
            redis_url,
            prefix=redis_prefix,
            replica_id=replica_id,
            lease_ttl_s=lease_ttl_s,
            cluster=redis_cluster,
        )
    raise ValueError(f"Unknown state store ({kind!r}); valid: {', '.join(STORE_KINDS)}")


__all__ = [
    "MAGIC",
    "NO_LEASE",
    "STORE_KINDS",
    "CorruptRecordError",
    "Lease",
    "LocalStore",
    "MemoryStore",
    "RedisStore",
    "StateStore",
    "StoreConflictError",
    "StoreError",
    "StoreKind",
    "StreamRecord",
    "create_store",
    "decode_record",
    "encode_record",
    "stream_file_name",
]
