"""Tests of bench.data: the CIFAR-10 loader, the CIFAR-10-C cache and the command line."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench import data
from bench.corruptions import corrupt
from bench.data import (
    CIFAR10_CLASSES,
    DataError,
    cifar10c_path,
    load_cifar10,
    load_cifar10c,
    main,
)


def _no_more_work(*args: object, **kwargs: object) -> None:
    raise AssertionError("expected a cache hit")


def test_load_cifar10_test_split(
    cifar10_test: tuple[np.ndarray, np.ndarray],
    cifar10_dir: Path,
    data_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images, labels = cifar10_test
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * len(CIFAR10_CLASSES)
    # Classes interleave, so any prefix is balanced.
    assert labels[:20].tolist() == list(range(10)) * 2
    # The second call reads the cache: neither the checksum nor the archive again.
    monkeypatch.setattr(data, "_sha256", _no_more_work)
    monkeypatch.setattr(data, "_read_archive", _no_more_work)
    cached_images, cached_labels = load_cifar10("test", cifar10_dir, data_cache)
    np.testing.assert_array_equal(cached_images, images)
    np.testing.assert_array_equal(cached_labels, labels)


def test_load_cifar10_refuses_a_tampered_archive(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "cifar10-test-jpeg.tar.gz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("test/cat/0000.jpg"), io.BytesIO())
    with pytest.raises(DataError, match="sha256"):
        load_cifar10("test", tmp_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_load_cifar10_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown split 'val'; valid: train, test"):
        load_cifar10("val", tmp_path, tmp_path)


def test_load_cifar10c_round_trip(
    cifar10_test: tuple[np.ndarray, np.ndarray],
    cifar10_dir: Path,
    data_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean, clean_labels = cifar10_test
    images, labels = load_cifar10c("fog", 2, cifar10_dir, data_cache, seed=11, n=10)
    assert cifar10c_path("fog", 2, data_cache, seed=11, n=10).is_file()
    np.testing.assert_array_equal(images, corrupt(clean[:10], "fog", 2, seed=11))
    np.testing.assert_array_equal(labels, clean_labels[:10])
    # Cached now; a smaller n is generated on its own and equals the prefix.
    monkeypatch.setattr(data, "corrupt", _no_more_work)
    again, _ = load_cifar10c("fog", 2, cifar10_dir, data_cache, seed=11, n=10)
    np.testing.assert_array_equal(again, images)
    monkeypatch.undo()
    prefix, _ = load_cifar10c("fog", 2, cifar10_dir, data_cache, seed=11, n=4)
    np.testing.assert_array_equal(prefix, images[:4])


def test_load_cifar10c_slices_a_cached_full_set(tmp_path: Path) -> None:
    full = cifar10c_path("contrast", 5, tmp_path)
    full.parent.mkdir(parents=True)
    stand_in = np.arange(6 * 32 * 32 * 3, dtype=np.uint8).reshape(6, 32, 32, 3)
    np.savez(full, images=stand_in, labels=np.arange(6))
    images, labels = load_cifar10c("contrast", 5, tmp_path / "no-data", tmp_path, n=3)
    np.testing.assert_array_equal(images, stand_in[:3])
    assert labels.tolist() == [0, 1, 2]


def test_load_cifar10c_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown corruption"):
        load_cifar10c("rain", 1, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c("fog", 6, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="n must be positive"):
        load_cifar10c("fog", 1, tmp_path, tmp_path, n=0)


def test_command_line_generates_the_requested_sets(
    cifar10_test: tuple[np.ndarray, np.ndarray], cifar10_dir: Path, data_cache: Path
) -> None:
    dirs = ["--data-dir", str(cifar10_dir), "--cache-dir", str(data_cache)]
    selection = ["--corruptions", "contrast", "pixelate", "--severities", "1", "5"]
    main([*dirs, *selection, "--n", "8", "--seed", "3"])
    for name in ("contrast", "pixelate"):
        for severity in (1, 5):
            with np.load(cifar10c_path(name, severity, data_cache, seed=3, n=8)) as files:
                np.testing.assert_array_equal(
                    files["images"], corrupt(cifar10_test[0][:8], name, severity, seed=3)
                )
