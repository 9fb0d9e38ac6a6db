"""The stream state stores: one contract over every backend, then each backend's own guarantees.

The Redis tests run against a real redis-server (tests/service/redis_server.py); they fail, not
skip, when it is not installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.schemas import StreamPublic
from service.stores import (
    MAGIC,
    STORE_KINDS,
    CorruptRecordError,
    LocalStore,
    MemoryStore,
    RedisStore,
    StateStore,
    StoreConflictError,
    StoreError,
    StreamInfo,
    StreamRecord,
    create_store,
    decode_record,
    encode_record,
    stream_file_name,
)
from tests.service.redis_server import (
    RedisServerUnavailable,
    free_port,
    running_redis,
    running_redis_cluster,
)

HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "..", "a/b\\c", "nul\x00byte", "ünï-çødé"]


def make_record(stream_id: str = "cam-1", **changes: object) -> StreamRecord:
    """A record with every field set to something non-trivial; `changes` override fields."""
    fields: dict[str, object] = {
        "id": stream_id,
        "model": "cifar10_resnet20",
        "adapter": "adabn",
        "config": {"momentum": 0.1, "mode": "running", "layers": [1, 2, 3], "nested": {"k": None}},
        "seed": 1234,
        "created_at": 1764072000.123456,
        "ttl_seconds": 3600.5,
        # every byte value, including NUL and the magic itself, to catch any text handling
        "state": bytes(range(256)) * 3 + MAGIC,
    }
    fields.update(changes)
    return StreamRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session; fails (not skips) if it is not installed."""
    try:
        with running_redis() as url:
            yield url
    except RedisServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A real three-node Redis Cluster for the whole session (fails if Redis is not installed)."""
    try:
        with running_redis_cluster() as url:
            yield url
    except RedisServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def redis_prefix() -> str:
    """A key namespace of its own for each test, so tests sharing the server never collide."""
    return f"test-{uuid.uuid4().hex}:"


@pytest.fixture(params=[*STORE_KINDS, "redis-cluster"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A fresh, empty store of each kind (and Redis as a cluster), made by the factory."""
    kind = request.param
    if kind.startswith("redis"):
        cluster = kind == "redis-cluster"
        url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
        made = create_store(
            "redis",
            redis_url=url,
            redis_prefix=request.getfixturevalue("redis_prefix"),
            redis_cluster=cluster,
        )
    else:
        made = create_store(kind, directory=tmp_path / "streams")
    yield made
    made.close()


# --- the contract, over every backend ------------------------------------------------------


def test_round_trip_is_exact(store: StateStore) -> None:
    record = make_record()
    store.put(record)
    assert store.get("cam-1") == record
    assert isinstance(store, StateStore)


def test_round_trip_of_none_ttl_empty_state_and_large_state(store: StateStore) -> None:
    empty = make_record("empty", ttl_seconds=None, state=b"")
    large = make_record("large", state=os.urandom(3 * 1024 * 1024))
    store.put(empty)
    store.put(large)
    got_empty, got_large = store.get("empty"), store.get("large")
    assert got_empty == empty and got_empty is not None and got_empty.ttl_seconds is None
    assert got_large is not None and got_large.state == large.state


def test_unicode_config_and_big_seed_survive(store: StateStore) -> None:
    config = {"label": "Zürich 東京 🚀", 'quote"key': "back\\slash\nnewline", "big": 2**62}
    record = make_record("uni", config=config, seed=2**63 - 1, created_at=0.1 + 0.2)
    store.put(record)
    assert store.get("uni") == record


def test_get_absent_is_none(store: StateStore) -> None:
    assert store.get("nobody") is None


def test_overwrite_replaces_the_record(store: StateStore) -> None:
    store.put(make_record(state=b"old"))
    newer = make_record(state=b"new", adapter="momentum", ttl_seconds=None)
    store.put(newer)
    assert store.get("cam-1") == newer
    assert store.ids() == ["cam-1"]


def test_delete_and_delete_absent(store: StateStore) -> None:
    store.put(make_record("a"))
    store.put(make_record("b"))
    store.delete("a")
    store.delete("a")
    store.delete("never-existed")
    assert store.get("a") is None
    assert store.ids() == ["b"]


def test_ids_and_load_all_are_sorted_and_complete(store: StateStore) -> None:
    assert store.ids() == []
    assert list(store.load_all()) == []
    records = [make_record(name, seed=i) for i, name in enumerate(["zeta", "alpha", "mid.1_x"])]
    for record in records:
        store.put(record)
    assert store.ids() == ["alpha", "mid.1_x", "zeta"]
    assert list(store.load_all()) == sorted(records, key=lambda r: r.id)


@pytest.mark.parametrize("hostile_id", HOSTILE_IDS)
def test_hostile_ids_are_stored_safely(store: StateStore, hostile_id: str, tmp_path: Path) -> None:
    record = make_record(hostile_id)
    store.put(record)
    assert store.get(hostile_id) == record
    assert store.ids() == [hostile_id]
    # a local store's only file is inside its directory; the other backends write no file
    expected = [f"streams/{stream_file_name(hostile_id)}"] if isinstance(store, LocalStore) else []
    assert files_under(tmp_path) == expected


def test_stored_config_is_a_copy(store: StateStore) -> None:
    record = make_record()
    store.put(record)
    record.config["mode"] = "changed after put"
    got = store.get("cam-1")
    assert got is not None and got.config["mode"] == "running"


@pytest.mark.parametrize("config", [{"x": {1, 2}}, {"x": float("nan")}, {"x": b"bytes"}])
def test_non_json_config_is_a_store_error(store: StateStore, config: dict) -> None:
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.put(make_record(config=config))
    assert store.ids() == []


def test_concurrent_puts_from_threads(store: StateStore) -> None:
    def worker(n: int) -> None:
        for i in range(10):
            store.put(make_record(f"t{n}-{i}", seed=i, state=bytes([n, i]) * 100))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.ids()) == 60
    got = store.get("t5-9")
    assert got is not None and got.state == bytes([5, 9]) * 100


def test_closed_store_raises(store: StateStore) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.put(make_record())
    with pytest.raises(StoreError, match="closed"):
        store.get("cam-1")
    with pytest.raises(StoreError, match="closed"):
        store.ids()


def test_factory_rejects_unknown_kind_and_missing_arguments() -> None:
    with pytest.raises(ValueError, match=r"Unknown state store \('sqlite'\); valid: memory, local"):
        create_store("sqlite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a directory"):
        create_store("local")
    with pytest.raises(ValueError, match="needs a redis_url"):
        create_store("redis")
    assert isinstance(create_store("memory"), MemoryStore)


# --- the binary format ---------------------------------------------------------------------


def test_encoding_layout() -> None:
    record = make_record(state=b"\x00STATE")
    data = encode_record(record)
    assert data[:8] == MAGIC == b"TTASTRM\x01"
    (length,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12 : 12 + length].decode("utf-8"))
    assert data[12 + length :] == b"\x00STATE"
    assert header == {
        "id": "cam-1",
        "model": "cifar10_resnet20",
        "adapter": "adabn",
        "config": record.config,
        "seed": 1234,
        "created_at": 1764072000.123456,
        "ttl_seconds": 3600.5,
        "tenant": "",
        "auto_reset": None,
        "feedback": False,
        "snapshots": 0,
        "frozen": False,
        "state_length": 6,
        "state_sha256": hashlib.sha256(b"\x00STATE").hexdigest(),
    }
    assert decode_record(data) == record


def header_of(data: bytes) -> dict[str, object]:
    """The JSON header of an encoded record."""
    (length,) = struct.unpack(">I", data[8:12])
    header: dict[str, object] = json.loads(data[12 : 12 + length])
    return header


def test_the_stream_record_is_defined_once() -> None:
    # StreamInfo is the one list of a stream's fields: the header and the API view follow it.
    names = [f.name for f in dataclasses.fields(StreamInfo)]
    header = header_of(encode_record(make_record()))
    assert list(header) == [*names, "state_length", "state_sha256"]
    view = ["samples", "auto_resets", "last_auto_reset", "accuracy"]  # not stored
    assert [f.name for f in dataclasses.fields(StreamPublic)] == [*names, *view]
    assert StreamInfo.of(make_record()) == StreamInfo(**make_record().fields())


def test_a_record_written_before_a_field_existed_loads_with_its_default() -> None:
    # Records stored before streams had tenants have no "tenant": they belong to none.
    header = {k: v for k, v in header_of(encode_record(make_record())).items() if k != "tenant"}
    text = json.dumps(header).encode()
    record = decode_record(MAGIC + struct.pack(">I", len(text)) + text + make_record().state)
    assert record.tenant == "" and record == make_record()


def test_header_field_of_the_wrong_type_is_named() -> None:
    header = header_of(encode_record(make_record()))
    for name, bad in [("seed", True), ("created_at", "1"), ("config", []), ("id", 1)]:
        text = json.dumps({**header, name: bad}).encode()
        data = MAGIC + struct.pack(">I", len(text)) + text + make_record().state
        with pytest.raises(CorruptRecordError, match=f"header field '{name}' is missing or has"):
            decode_record(data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:5], "shorter than the fixed prefix"),
        (lambda d: b"XXXXXXXX" + d[8:], "bad magic"),
        (lambda d: d[:20], "truncated inside the header"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"extra", "header says"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "sha256"),
        (lambda d: d[:8] + struct.pack(">I", 2**31) + d[12:], "over"),
        (lambda d: d[:8] + struct.pack(">I", 2) + b"{}", "missing or has the wrong type"),
    ],
)
def test_decoding_damaged_data_is_a_corrupt_record_error(damage, message: str) -> None:
    with pytest.raises(CorruptRecordError, match=message):
        decode_record(damage(encode_record(make_record())))


# --- LocalStore ----------------------------------------------------------------------------


def files_under(root: Path) -> list[str]:
    """Every file below `root`, as paths relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_file_is_named_by_sha256_and_holds_the_encoding(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    record = make_record("../../etc/passwd")
    store.put(record)
    name = hashlib.sha256(b"../../etc/passwd").hexdigest() + ".stream"
    assert stream_file_name("../../etc/passwd") == name
    assert files_under(tmp_path) == [f"s/{name}"]
    assert (tmp_path / "s" / name).read_bytes() == encode_record(record)


def test_local_store_persists_across_instances(tmp_path: Path) -> None:
    LocalStore(tmp_path).put(make_record())
    assert LocalStore(tmp_path).get("cam-1") == make_record()


def test_local_leftover_temp_file_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put(make_record("a"))
    # what a crash between mkstemp and os.replace leaves behind, and unrelated files
    (tmp_path / ".tmp-abc123").write_bytes(encode_record(make_record("ghost"))[:30])
    (tmp_path / "README.txt").write_text("not a stream")
    (tmp_path / "sub").mkdir()
    assert store.ids() == ["a"]
    assert [r.id for r in store.load_all()] == ["a"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],  # truncated in the state
        lambda d: d[:10],  # truncated in the prefix
        lambda d: b"",  # empty file
        lambda d: b"garbage" * 10,  # not ours at all
        lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]),  # bit rot in the state: caught by sha256
    ],
)
def test_local_corrupt_file_is_skipped_by_load_all_and_an_error_for_get(
    tmp_path: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalStore(tmp_path)
    store.put(make_record("good"))
    store.put(make_record("bad"))
    path = store.path_for("bad")
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="service.stores"):
        assert [r.id for r in store.load_all()] == ["good"]
    assert str(path) in caplog.text and "skipping stream file" in caplog.text
    with pytest.raises(CorruptRecordError, match="'bad'"):
        store.get("bad")
    assert store.get("good") == make_record("good")
    store.delete("bad")  # a corrupt stream can still be deleted
    assert store.ids() == ["good"]


def test_local_file_of_another_stream_under_a_wrong_name_is_corrupt(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put(make_record("a"))
    os.replace(store.path_for("a"), store.path_for("b"))
    with pytest.raises(CorruptRecordError, match="does not match"):
        store.get("b")
    assert store.ids() == []
    assert list(store.load_all()) == []


def test_local_failed_write_keeps_the_old_record_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)
    store.put(make_record(state=b"old"))

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StoreError, match=r"cannot write stream 'cam-1'.*Input/output error"):
        store.put(make_record(state=b"new"))
    monkeypatch.undo()
    assert store.get("cam-1") == make_record(state=b"old")
    assert files_under(tmp_path) == [stream_file_name("cam-1")]


def test_local_missing_directory_without_create_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        LocalStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_local_missing_directory_is_created(tmp_path: Path) -> None:
    LocalStore(tmp_path / "a" / "b").put(make_record())
    assert files_under(tmp_path) == [f"a/b/{stream_file_name('cam-1')}"]


def test_local_directory_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not usable"):
        LocalStore(tmp_path / "file")
    with pytest.raises(StoreError, match="not usable"):
        LocalStore(tmp_path / "file" / "below")


def test_local_directory_removed_while_running_is_a_store_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    (tmp_path / "s").rmdir()
    with pytest.raises(StoreError, match="cannot write stream"):
        store.put(make_record())
    with pytest.raises(StoreError, match="cannot list"):
        store.ids()
    with pytest.raises(StoreError, match="cannot list"):
        list(store.load_all())
    assert store.get("cam-1") is None


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_local_read_only_directory_is_a_store_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    store = LocalStore(directory)
    directory.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="not usable"):
            LocalStore(directory)
        with pytest.raises(StoreError, match="cannot write stream"):
            store.put(make_record())
    finally:
        directory.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_local_directory_where_no_file_can_be_created_is_a_store_error() -> None:
    # procfs refuses new files even to root, unlike a chmod-ed directory
    with pytest.raises(StoreError, match="state directory /proc/self is not usable"):
        LocalStore(Path("/proc/self"))


# --- RedisStore against a real redis-server ------------------------------------------------


def test_redis_layout_is_one_hash_tagged_by_id(redis_url: str, redis_prefix: str) -> None:
    """One hash per stream and no global key; every key of a stream is tagged with its id, so
    a Redis Cluster keeps them in one slot (the lease script touches three of them)."""
    store = RedisStore(redis_url, prefix=redis_prefix)
    record = make_record("cam/1")
    store.release("cam/1", store.acquire("cam/1").token)
    store.put(record)
    raw = redis.Redis.from_url(redis_url)
    assert sorted(raw.keys(f"{redis_prefix}*")) == [
        f"{redis_prefix}fence:{{cam/1}}".encode(),
        f"{redis_prefix}stream:{{cam/1}}".encode(),
    ]
    fields = raw.hgetall(f"{redis_prefix}stream:{{cam/1}}")
    # version: what a fenced write (a replica's, under a lease) checks; an unfenced put sets it
    assert set(fields) == {b"meta", b"state", b"version"}
    assert fields[b"version"] == b"0"
    assert fields[b"state"] == record.state
    assert json.loads(fields[b"meta"])["id"] == "cam/1"
    store.delete("cam/1")
    assert raw.keys(f"{redis_prefix}*") == [f"{redis_prefix}fence:{{cam/1}}".encode()]
    raw.close()
    store.close()


def test_redis_streams_of_the_id_set_layout_are_moved(redis_url: str, redis_prefix: str) -> None:
    """Streams written before hash tags (`stream:<id>` + an id set) are renamed at start-up,
    their fence counters too, so tokens keep growing; a second start-up finds nothing to move."""
    raw = redis.Redis.from_url(redis_url)
    old = RedisStore(redis_url, prefix=redis_prefix)
    for name in ["a", "b"]:
        old.put(make_record(name, state=name.encode()))
        raw.rename(f"{redis_prefix}stream:{{{name}}}", f"{redis_prefix}stream:{name}")
        raw.sadd(f"{redis_prefix}ids", name)
    raw.set(f"{redis_prefix}fence:a", 41)
    store = RedisStore(redis_url, prefix=redis_prefix)
    assert store.ids() == ["a", "b"]
    assert [r.state for r in store.load_all()] == [b"a", b"b"]
    assert store.acquire("a").token == 42
    assert raw.exists(f"{redis_prefix}ids", f"{redis_prefix}stream:a") == 0
    assert RedisStore(redis_url, prefix=redis_prefix).ids() == ["a", "b"]
    raw.close()


def test_redis_cluster_spreads_streams_over_its_shards(
    redis_cluster_url: str, redis_prefix: str
) -> None:
    """On a real three-node cluster: leases and fenced writes work on every shard, and the
    streams land on all three primaries (their hash slots come from their ids)."""
    store = RedisStore(redis_cluster_url, prefix=redis_prefix, cluster=True, replica_id="r")
    names = [f"cam-{i}" for i in range(30)]
    for name in names:
        lease = store.acquire(name)
        store.put(make_record(name, version=1), lease.token)
        with pytest.raises(StoreConflictError):
            store.put(make_record(name, version=1), lease.token + 1)
    assert store.ids() == sorted(names)
    client = redis.RedisCluster.from_url(redis_cluster_url)
    nodes = {client.get_node_from_key(f"{redis_prefix}stream:{{{n}}}").name for n in names}
    assert len(nodes) == 3
    client.close()
    store.close()


def test_redis_prefixes_isolate_stores(redis_url: str, redis_prefix: str) -> None:
    one = RedisStore(redis_url, prefix=redis_prefix + "one:")
    two = RedisStore(redis_url, prefix=redis_prefix + "two:")
    one.put(make_record("x"))
    assert two.ids() == [] and two.get("x") is None
    assert RedisStore(redis_url, prefix=redis_prefix + "one:").get("x") == make_record("x")


def test_redis_corrupt_or_dangling_entries_are_skipped(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    for name in ["good", "bad-json", "bad-state", "no-state", "other-id"]:
        store.put(make_record(name))
    raw = redis.Redis.from_url(redis_url)
    raw.hset(f"{redis_prefix}stream:{{bad-json}}", "meta", b"{not json")
    raw.hset(f"{redis_prefix}stream:{{bad-state}}", "state", b"tampered")
    raw.hdel(f"{redis_prefix}stream:{{no-state}}", "state")
    other_meta = raw.hget(f"{redis_prefix}stream:{{good}}", "meta")
    raw.hset(f"{redis_prefix}stream:{{other-id}}", "meta", other_meta)
    raw.set(f"{redis_prefix}stream:{{dangling}}", b"not a hash")  # matches, wrong type
    raw.hset(f"{redis_prefix}stream:{{".encode() + b"\xff}", "meta", b"{}")  # id not UTF-8
    raw.close()
    with caplog.at_level(logging.WARNING, logger="service.stores"):
        assert [r.id for r in store.load_all()] == ["good"]
    for name in ["bad-json", "bad-state", "no-state", "other-id"]:
        assert repr(name) in caplog.text
    assert "not UTF-8" in caplog.text
    for name, message in [
        ("bad-json", "not UTF-8 JSON"),
        ("bad-state", "header says"),
        ("no-state", "lacks"),
        ("other-id", "holds id 'good'"),
    ]:
        with pytest.raises(CorruptRecordError, match=message):
            store.get(name)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        store.get("dangling")


def test_redis_load_all_spans_several_pipeline_chunks(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    names = [f"s{i:04d}" for i in range(600)]
    for name in names:
        store.put(make_record(name, state=name.encode()))
    loaded = list(store.load_all())
    assert [r.id for r in loaded] == names
    assert all(r.state == r.id.encode() for r in loaded)


def test_redis_dead_port_is_a_quick_store_error() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(StoreError, match=re.escape(f"Redis at redis://127.0.0.1:{port}/0 is not")):
        RedisStore(f"redis://127.0.0.1:{port}/0")
    assert time.monotonic() - start < 5


def test_redis_errors_never_show_the_password() -> None:
    port = free_port()
    with pytest.raises(StoreError) as caught:
        create_store("redis", redis_url=f"redis://user:s3cret@127.0.0.1:{port}/0")
    assert "s3cret" not in str(caught.value)
    assert f"redis://user:***@127.0.0.1:{port}/0" in str(caught.value)


def test_redis_server_going_away_is_a_store_error() -> None:
    with running_redis() as url:
        store = RedisStore(url)
        store.put(make_record())
        assert store.get("cam-1") == make_record()
    # the server is stopped (by PID) when the context exits
    start = time.monotonic()
    for call in [lambda: store.get("cam-1"), lambda: store.put(make_record()), store.ids]:
        with pytest.raises(StoreError, match=r"Redis at redis://127\.0\.0\.1"):
            call()
    with pytest.raises(StoreError):
        list(store.load_all())
    assert time.monotonic() - start < 10
    store.close()


def test_running_redis_fails_clearly_without_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with (
        pytest.raises(RedisServerUnavailable, match="apt-get install -y redis-server"),
        running_redis(),
    ):
        pass
