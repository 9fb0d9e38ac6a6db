"""CIFAR-10 and a generated CIFAR-10-C for the accuracy benchmark, cached as .npz files.

The clean images come from the JPEG archives described in `../shared/data/cifar10/README.md`; the
corrupted test sets are generated from them with `bench.corruptions` and written once to a cache
directory. Pre-generate them with:

    python -m bench.data --data-dir ../shared/data/cifar10 --cache-dir .cache/data
"""

import argparse
import hashlib
import io
import logging
import multiprocessing
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.corruptions import CORRUPTIONS, SEVERITIES, corrupt, get_corruption

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# split -> (number of images, sha256 of cifar10-{split}-jpeg.tar.gz), from the data set's README
_ARCHIVES = {
    "train": (50_000, "e23a05ee43cf7e36fa212a9774e47d68233c1595ee3ed2b5c790b00c6767fb31"),
    "test": (10_000, "2f78efc30b2c0bb10b3c9e22a3c9a788ae74677a6e367fe5703461199ffe67e0"),
}


class DataError(Exception):
    """An archive that is missing, corrupt, or does not hold the expected images."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a set to `path` atomically: readers (other processes too) never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp", delete=False
    ) as f:
        tmp = Path(f.name)
        try:
            np.savez(f, images=images, labels=labels)
        except BaseException:
            tmp.unlink()
            raise
    tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; the cache is shared like any output file
    tmp.replace(path)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["images"], data["labels"]


def _read_archive(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode every `{split}/<class>/<NNNN>.jpg` of a tar.gz archive, in the canonical order."""
    entries = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            if parts[0] != split or parts[1] not in CIFAR10_CLASSES:
                raise DataError(f"{archive}: unexpected member {member.name!r}")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            entries.append((parts[2], CIFAR10_CLASSES.index(parts[1]), image))
    # Sorted by file name, then class: the archive groups the images by class, and interleaving
    # the classes makes every prefix (the n-image modes, streams cut from the start) balanced.
    entries.sort(key=lambda entry: entry[:2])
    images = np.stack([image for _, _, image in entries])
    labels = np.array([label for _, label, _ in entries], dtype=np.int64)
    return images, labels


def load_cifar10(split: str, data_dir: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 `split` ("train" or "test") as uint8 images [N, 32, 32, 3] and int64 labels [N].

    Reads `data_dir/cifar10-{split}-jpeg.tar.gz` once (checking its sha256) and caches the arrays
    as `cache_dir/cifar10-{split}.npz`. The order is deterministic: images sorted by file name
    (`<NNNN>.jpg`), then by class in the standard order, so classes alternate 0, 1, ..., 9, 0, ...
    and any prefix is class-balanced.
    """
    if split not in _ARCHIVES:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(_ARCHIVES)}")
    cache = Path(cache_dir) / f"cifar10-{split}.npz"
    if not cache.exists():
        expected_count, expected_sha = _ARCHIVES[split]
        archive = Path(data_dir) / f"cifar10-{split}-jpeg.tar.gz"
        if not archive.is_file():
            raise DataError(f"{archive} not found")
        if (sha := _sha256(archive)) != expected_sha:
            raise DataError(f"{archive}: sha256 {sha}, expected {expected_sha}")
        logger.info("decoding %s into %s", archive, cache)
        images, labels = _read_archive(archive, split)
        if images.shape != (expected_count, 32, 32, 3):
            raise DataError(
                f"{archive}: images of shape {images.shape}, expected {(expected_count, 32, 32, 3)}"
            )
        _save_npz(cache, images=images, labels=labels)
    return _load_npz(cache)


def cifar10c_path(
    corruption: str, severity: int, cache_dir: Path, seed: int = 0, n: int | None = None
) -> Path:
    """Cache file of a generated CIFAR-10-C set (`n` images, or the whole test set if None)."""
    suffix = "" if n is None else f"-n{n}"
    return Path(cache_dir) / "cifar10c" / f"{corruption}-s{severity}-seed{seed}{suffix}.npz"


def load_cifar10c(
    corruption: str,
    severity: int,
    data_dir: Path,
    cache_dir: Path,
    seed: int = 0,
    n: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10-C-style test set: the JPEG test set with `corruption` at `severity` (1-5).

    Images are uint8 [N, 32, 32, 3] in the order of `load_cifar10("test", ...)`, labels int64 [N].
    Generated with `bench.corruptions.corrupt` on the first use and cached under
    `cache_dir/cifar10c/`; `n` keeps the first n images. Image i depends only on (seed, corruption,
    severity, i), so a subset equals the prefix of the full set: a cached full set serves any `n`,
    otherwise only the n images are generated (and cached as their own `-n<n>` file).

    Example:
        >>> images, labels = load_cifar10c("fog", 5, data_dir, cache_dir, n=1000)
    """
    get_corruption(corruption)  # fail on a bad name before any work
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if n is not None and n >= _ARCHIVES["test"][0]:
        n = None
    full = cifar10c_path(corruption, severity, cache_dir, seed)
    if full.exists():
        images, labels = _load_npz(full)
        return images[:n], labels[:n]
    path = cifar10c_path(corruption, severity, cache_dir, seed, n)
    if not path.exists():
        clean, labels = load_cifar10("test", data_dir, cache_dir)
        clean, labels = clean[:n], labels[:n]
        logger.info("generating %s", path)
        _save_npz(path, images=corrupt(clean, corruption, severity, seed), labels=labels)
    return _load_npz(path)


def _generate(task: tuple[str, int, Path, Path, int, int | None]) -> str:
    """Pool worker: build one cached corrupted set."""
    corruption, severity, data_dir, cache_dir, seed, n = task
    load_cifar10c(corruption, severity, data_dir, cache_dir, seed, n)
    return f"{corruption}-s{severity}"


def main(argv: list[str] | None = None) -> None:
    """Command line: pre-generate the CIFAR-10-C sets of the given corruptions and severities."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/cifar10"),
        help="folder holding cifar10-test-jpeg.tar.gz",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/data"))
    parser.add_argument(
        "--corruptions",
        nargs="+",
        choices=list(CORRUPTIONS),
        default=list(CORRUPTIONS),
        metavar="NAME",
    )
    parser.add_argument(
        "--severities", nargs="+", type=int, choices=SEVERITIES, default=list(SEVERITIES)
    )
    parser.add_argument("--n", type=int, default=None, help="first n test images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    # Decode the clean test set once, before the workers all need it.
    load_cifar10("test", args.data_dir, args.cache_dir)
    tasks = [
        (c, s, args.data_dir, args.cache_dir, args.seed, args.n)
        for c in args.corruptions
        for s in args.severities
    ]
    # spawn: workers start clean instead of inheriting a forked copy of OpenCV's thread pool.
    with multiprocessing.get_context("spawn").Pool(min(args.workers, len(tasks))) as pool:
        for name in tqdm(
            pool.imap_unordered(_generate, tasks), total=len(tasks), desc="CIFAR-10-C", unit="set"
        ):
            logger.debug("done %s", name)


if __name__ == "__main__":
    main()
