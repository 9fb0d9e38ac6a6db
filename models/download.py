"""Weights files: download into a cache with a sha256 check, and read them without unpickling code.

A file is trusted only by its digest: the full sha256 when the registry knows it, else the hash
prefix that torch.hub-style file names carry ("resnet44-014dd654.th", "resnet50-0676ba61.pth").
Files are read with `torch.load(..., weights_only=True)` or safetensors, never a full unpickler.
"""

import hashlib
import http.client
import logging
import os
import pickle
import re
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.errors import ModelError, WeightsChecksumError, WeightsUnavailableError

logger = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub's convention
_CHUNK = 1 << 20


def fetch_weights(
    url: str, sha256: str | None, cache_dir: Path, *, timeout: float = 10.0, name: str | None = None
) -> Path:
    """Return the path of the weights file at `url` in `cache_dir`, downloading it if needed.

    The file is named after the URL's basename. A cached file whose digest matches is used
    without any network access. A download goes to a temporary file in `cache_dir`, is checked,
    and only then renamed into place, so the cache never holds a partial or unverified file.

    Args:
        url: where the file is published.
        sha256: its full sha256 hex digest; None checks the file name's hash prefix, if any.
        cache_dir: the cache directory (created if missing).
        timeout: seconds to wait for the server (per connect or read) before giving up.
        name: the model's name, for error messages (default: the file name).

    Raises:
        WeightsUnavailableError: the file is not cached and the download failed.
        WeightsChecksumError: the cached or downloaded file has the wrong digest.

    Example:
        >>> fetch_weights(get_spec("resnet50").weights_url, None, Path("cache"))  # doctest: +SKIP
        PosixPath('cache/resnet50-0676ba61.pth')
    """
    filename = PurePosixPath(urlparse(url).path).name
    expected = (sha256 or _hash_prefix(filename)).lower()
    if not expected:
        logger.warning("no sha256 known for %s: the file is used unverified", url)
    path = cache_dir / filename
    label = name or filename
    if path.is_file():
        digest = sha256_of(path)
        if not digest.startswith(expected):
            raise WeightsChecksumError(
                f"cached weights for {label} at {path} have sha256 {digest}, expected {expected}; "
                "delete the file to download it again"
            )
        return path

    logger.info("downloading weights for %s from %s into %s", label, url, cache_dir)
    try:
        digest = _download(url, path, expected, timeout=timeout)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        reason = getattr(err, "reason", None) or err
        raise WeightsUnavailableError(
            f"weights for {label} are not in the cache ({path}) and could not be downloaded "
            f"from {url}: {reason}"
        ) from err
    if not digest.startswith(expected):
        raise WeightsChecksumError(
            f"weights for {label} downloaded from {url} have sha256 {digest}, expected {expected}; "
            "the file was discarded"
        )
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file or a `torch.save` file, safely.

    A `{"state_dict": ...}` checkpoint wrapper is unwrapped and a `module.` prefix (saved from
    `nn.DataParallel`) is stripped.

    Raises:
        WeightsUnavailableError: the file does not exist.
        ModelError: the file cannot be read as a state dict.
    """
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            loaded: object = load_file(path, device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Not torch's advice to retry without the weights-only loader: that is how pickles run code.
        raise ModelError(
            f"weights file {path} holds more than tensors (or is not a torch file); refused, "
            "as loading it would need a full unpickler, which can run arbitrary code"
        ) from err
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise ModelError(f"cannot read weights file {path}: {err}") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ModelError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_prefix(filename: str) -> str:
    """The sha256 prefix in a torch.hub-style file name ("resnet20-12fca82f.th"), or ""."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else ""


def _download(url: str, path: Path, expected: str, *, timeout: float) -> str:
    """Stream `url` to a temporary file and rename it to `path` only if its sha256 starts with
    `expected`; return the digest either way (a mismatching file is deleted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest().startswith(expected):
            os.replace(tmp, path)  # atomic: readers see no file or the whole, verified file
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()
