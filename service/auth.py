"""API keys, tenants and roles: who is calling, and what they may do (docs/security.md).

A key looks like ``tta_<id>_<secret>``. The server stores, per key, its public ``id``, the scrypt
hash of the whole key, the tenant it acts for and its role; never the key itself, and it never
logs one. A request presents its key as ``Authorization: Bearer <key>`` (or ``X-API-Key``); the
key's ``id`` picks the one entry whose hash is checked, so a wrong key costs one scrypt, not one
per configured key, on a pool of its own. A verified key is remembered (by its SHA-256) until the
keys change, and so are the last refused ones.

Keys come from the settings (``api_keys``) and from a keys file (``api_keys_file``, TOML or
JSON, ``keys = [...]``), which is read again whenever it changes (its mtime, size or inode), on
the next request: no restart. A file that does not parse keeps the keys in force, and says why
in the log. Without any key configured, authentication is off: every caller is the anonymous
admin of the tenant ``""`` (which the settings allow on a loopback bind only).

``python -m service.auth new --tenant acme --role user`` makes a key and its settings entry;
``python -m service.auth hash`` hashes a key read from stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ForbiddenError, UnauthorizedError
from service.streams import stream_key, validate_stream_id

if TYPE_CHECKING:
    from service.settings import Settings  # which imports this module's ApiKey

logger = logging.getLogger(__name__)

Role = Literal["admin", "user", "reader", "metrics"]
Permission = Literal["read", "write", "metrics", "docs", "any_tenant"]

# What each role may do. read: list and read streams, their state and drift, the catalog;
# write: create, predict, reset, import, delete; any_tenant: act for another tenant (X-Tenant).
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    "admin": frozenset({"read", "write", "metrics", "docs", "any_tenant"}),
    "user": frozenset({"read", "write", "docs"}),
    "reader": frozenset({"read", "docs"}),
    "metrics": frozenset({"metrics"}),
}

TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
KEY_PREFIX = "tta"
KEY_ID = re.compile(r"^[a-z0-9]{8,32}$")
TENANT_HEADER = "x-tenant"

# scrypt at the cost OWASP recommends for it (N=2**17 is the password figure; keys are random
# 256-bit secrets, so 2**14 keeps a wrong key cheap to refuse and still slow to brute-force).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_THREADS = 2  # scrypt checks at once (16 MiB each)
REFUSED_KEPT = 1024
_HASH = re.compile(r"^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


class ApiKey(BaseModel):
    """A configured API key: its public id, the scrypt hash of the key, its tenant and role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=KEY_ID.pattern, description="the key's public part (tta_<id>_...)")
    hash: str = Field(pattern=_HASH.pattern, description="scrypt$N$r$p$salt$hash (base64)")
    tenant: str = Field(pattern=TENANT.pattern, description="the tenant the key acts for")
    role: Role = Field(description="admin, user, reader or metrics")


class KeysFile(BaseModel):
    """The keys file: ``keys = [{id, hash, tenant, role}, ...]``."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)


# --- hashing --------------------------------------------------------------------------------


def new_key() -> str:
    """A fresh random key, ``tta_<id>_<secret>`` (an 8-byte id, a 256-bit secret)."""
    return f"{KEY_PREFIX}_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def key_id(key: str) -> str | None:
    """The public id of a key, or None if it does not look like one."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not KEY_ID.fullmatch(parts[1]):
        return None
    return parts[1]


def hash_key(key: str, *, salt: bytes | None = None) -> str:
    """The scrypt hash of ``key`` as stored: ``scrypt$N$r$p$<salt>$<hash>``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encoded[0]}${encoded[1]}"


def verify_key(key: str, stored: str) -> bool:
    """Whether ``key`` hashes to ``stored`` (compared in constant time)."""
    match = _HASH.fullmatch(stored)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt, expected = base64.b64decode(match.group(4)), base64.b64decode(match.group(5))
    digest = hashlib.scrypt(
        key.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=256 * n * r + 2**20
    )
    return hmac.compare_digest(digest, expected)


# --- callers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the tenant it acts for, its role, and its key's id (None: no auth)."""

    tenant: str
    role: Role
    key_id: str | None = None

    def can(self, permission: Permission) -> bool:
        """Whether the caller's role allows ``permission``."""
        return permission in PERMISSIONS[self.role]

    def key(self, stream_id: str) -> str:
        """The registry key of the caller's stream ``stream_id`` (InvalidStreamIdError if bad).

        Every stream route goes through here: a tenant names only its own streams.
        """
        return stream_key(self.tenant, validate_stream_id(stream_id))


ANONYMOUS = Caller(tenant="", role="admin")
"""Every caller when authentication is off."""


@dataclass
class KeyRing:
    """The keys in force, by id; the keys already verified and the last refused (by SHA-256).

    Remembering refused keys (the last ``REFUSED_KEPT``) makes a client that repeats a wrong
    key cost no scrypt after the first.
    """

    keys: dict[str, ApiKey]
    verified: dict[bytes, Caller] = field(default_factory=dict)
    refused: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # scrypt threads write

    @classmethod
    def of(cls, keys: list[ApiKey]) -> KeyRing:
        """A ring of ``keys``; ValueError if two share an id."""
        ring = cls({key.id: key for key in keys})
        if len(ring.keys) != len(keys):
            raise ValueError("two API keys have the same id")
        return ring

    def known(self, key: str) -> tuple[bool, Caller | None]:
        """(True, its caller or None) if ``key`` was checked before; (False, None) if not."""
        fingerprint = _fingerprint(key)
        with self._lock:
            if fingerprint in self.refused:
                return True, None
            caller = self.verified.get(fingerprint)
        return caller is not None, caller

    def check(self, key: str) -> Caller | None:
        """The caller of ``key``, or None if it is not a valid key (runs scrypt: a thread)."""
        fingerprint = _fingerprint(key)
        entry = self.keys.get(key_id(key) or "")
        if entry is None or not verify_key(key, entry.hash):
            with self._lock:
                self.refused[fingerprint] = None
                while len(self.refused) > REFUSED_KEPT:
                    self.refused.popitem(last=False)
            return None
        caller = Caller(tenant=entry.tenant, role=entry.role, key_id=entry.id)
        with self._lock:
            self.verified[fingerprint] = caller
        return caller


def _fingerprint(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys of a TOML or JSON keys file; ValueError (or OSError) if it is not valid."""
    text = path.read_bytes()
    try:
        data = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
        return KeysFile.model_validate(data).keys
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid {path.suffix[1:].upper()}: {error}") from None
    except pydantic.ValidationError as error:
        raise ValueError(f"{path}: {error.error_count()} invalid entries: {error}") from None


class Authenticator:
    """The keys of the settings plus those of the keys file, read again when the file changes.

    Args:
        keys: the keys of the settings.
        keys_file: a TOML or JSON keys file (None: none); it must be readable at start-up.
    """

    def __init__(self, keys: list[ApiKey], keys_file: Path | None) -> None:
        self._keys = list(keys)
        self._file = keys_file
        self._seen: tuple[int, int, int] | None = None
        self._ring = KeyRing.of(self._keys)
        self._scrypt = ThreadPoolExecutor(SCRYPT_THREADS, thread_name_prefix="tta-auth")
        if keys_file is not None:
            self._reload(keys_file, initial=True)

    @property
    def enabled(self) -> bool:
        """Whether requests need a key (some key, or a keys file, is configured)."""
        return bool(self._keys) or self._file is not None

    def ring(self) -> KeyRing:
        """The keys in force now (the keys file is read again if it changed)."""
        if self._file is not None:
            self._reload(self._file, initial=False)
        return self._ring

    def _reload(self, path: Path, *, initial: bool) -> None:
        """Read the keys file again if it changed; at start-up (``initial``) any error raises."""
        try:
            stat = os.stat(path)
        except OSError as error:
            if initial:
                raise ValueError(f"API keys file {path}: {error}") from None
            return  # a file being replaced: keep the keys in force
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen == self._seen:
            return
        try:
            ring = KeyRing.of([*self._keys, *read_keys_file(path)])
        except (OSError, ValueError) as error:
            if initial:
                raise
            logger.error("API keys file not reloaded, the keys in force stay: %s", error)
        else:
            if not initial:
                logger.info("API keys reloaded from %s: %d keys", path, len(ring.keys))
            self._ring = ring
        self._seen = seen

    async def authenticate(self, request: Request) -> Caller:
        """The caller of an HTTP request: UnauthorizedError (401) without a valid key."""
        return await self.authenticate_headers(request.headers)

    async def authenticate_headers(self, headers: Mapping[str, str]) -> Caller:
        """The caller of a request with these (lower-case) headers or gRPC metadata.

        UnauthorizedError (401) without a valid key. ``X-Tenant`` lets an admin act for another
        tenant (empty: the streams of no tenant, made without keys); others may only name their
        own.
        """
        if not self.enabled:
            return ANONYMOUS
        key = presented_key(headers)
        if key is None:
            raise UnauthorizedError(
                "this server needs an API key: send it as 'Authorization: Bearer <key>'"
            )
        ring = self.ring()
        checked, caller = ring.known(key)
        if not checked:
            # scrypt on its own small pool: wrong keys cannot hold up the threads that decode
            # images, nor the event loop
            loop = asyncio.get_running_loop()
            caller = await loop.run_in_executor(self._scrypt, ring.check, key)
        if caller is None:
            raise UnauthorizedError("the API key is not valid (unknown, revoked or mistyped)")
        tenant = headers.get(TENANT_HEADER)
        if tenant is None or tenant == caller.tenant:
            return caller
        if not caller.can("any_tenant"):
            raise ForbiddenError(f"a {caller.role} key acts for its own tenant only (X-Tenant)")
        if tenant and not TENANT.fullmatch(tenant):  # "": the streams of no tenant
            raise ForbiddenError(f"X-Tenant must match {TENANT.pattern}")
        return Caller(tenant=tenant, role=caller.role, key_id=caller.key_id)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, if any."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None


# --- FastAPI dependencies -------------------------------------------------------------------


async def get_caller(request: Request) -> Caller:
    """The request's caller (401 without a valid key when authentication is on)."""
    authenticator: Authenticator = request.app.state.tta.auth
    return await authenticator.authenticate(request)


def require(caller: Caller, permission: Permission) -> Caller:
    """``caller``, if its role allows ``permission``; ForbiddenError (403) otherwise."""
    if not caller.can(permission):
        raise ForbiddenError(f"a {caller.role} key may not {_VERBS[permission]}")
    return caller


def allow(permission: Permission) -> Any:
    """A dependency: the caller, if its role allows ``permission``; 403 otherwise."""

    async def allowed(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
        return require(caller, permission)

    return Depends(allowed)


def allow_unless_public(permission: Permission, public: Callable[[Settings], bool]) -> Any:
    """A dependency: like :func:`allow`, but open to anyone where ``public(settings)``."""

    async def allowed(request: Request) -> None:
        if not public(request.app.state.tta.settings):
            require(await get_caller(request), permission)

    return Depends(allowed)


_VERBS: dict[Permission, str] = {
    "read": "read streams or models",
    "write": "create, change or delete streams",
    "metrics": "read the metrics",
    "docs": "read the API documentation",
    "any_tenant": "act for another tenant",
}

CallerDep = Annotated[Caller, Depends(get_caller)]
ReaderDep = Annotated[Caller, allow("read")]
WriterDep = Annotated[Caller, allow("write")]
AUTHENTICATED = Depends(get_caller)
READ = allow("read")
METRICS = allow_unless_public("metrics", lambda settings: settings.public_metrics)
DOCS = allow_unless_public("docs", lambda settings: settings.public_docs)


# --- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m service.auth``: make a key (``new``) or hash one read from stdin (``hash``)."""
    parser = argparse.ArgumentParser(prog="python -m service.auth", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a key; print it and its keys-file entry")
    new.add_argument("--tenant", required=True)
    new.add_argument("--role", required=True, choices=list(PERMISSIONS))
    commands.add_parser("hash", help="print the scrypt hash of the key on stdin")
    args = parser.parse_args(argv)
    if args.command == "hash":
        key = sys.stdin.readline().strip()
        if key_id(key) is None:
            parser.error("not a key of the form tta_<id>_<secret>")
        print(hash_key(key))
        return
    if not TENANT.fullmatch(args.tenant):
        parser.error(f"--tenant must match {TENANT.pattern}")
    key = new_key()
    entry = ApiKey(id=key_id(key) or "", hash=hash_key(key), tenant=args.tenant, role=args.role)
    print(f"key (give it to the client; it is not stored): {key}", file=sys.stderr)
    print("[[keys]]")
    for name, value in entry.model_dump().items():
        print(f"{name} = {json.dumps(value)}")


if __name__ == "__main__":
    main()
