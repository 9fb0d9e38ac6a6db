"""Tests of bench.corruptions: one contract over the registry, then closed forms of the helpers."""

import numpy as np
import pytest

from bench import corruptions
from bench.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    UnknownCorruptionError,
    corrupt,
    frost_textures,
    plasma_fractal,
)

# Corruptions that draw no random numbers: the seed must not matter.
DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
}

# Pairs (a, b): the mean absolute distance to the clean images grows from severity a to b. By
# default every step 1 < 2 < 3 < 4 < 5. The exceptions are genuine in the CIFAR parameters of
# make_cifar_c.py (checked over 40 draws of 12 images); each asserts what holds for all of them:
ORDER = {name: [(1, 2), (2, 3), (3, 4), (4, 5)] for name in CORRUPTIONS} | {
    # The pixel displacement dominates: one pass at s1-s3 (more blur there even lowers the
    # distance slightly), two passes at s4-s5.
    "glass_blur": [(a, b) for a in (1, 2, 3) for b in (4, 5)],
    # s3 (radius 6, sigma 2) and s4 (radius 8, sigma 2) differ only by taps of weight < 1.2%, so
    # the random blur directions decide between them.
    "motion_blur": [(1, 2), (2, 3), (3, 5), (4, 5)],
    # The image is dimmed (weights 1, 1, 0.9, 0.85, 0.75) as frost is added (0.2 ... 0.45): the
    # two cancel in pixel space, where the distance peaks around s3; s1 is always the mildest.
    "frost": [(1, 2), (1, 3), (1, 4), (1, 5)],
    # The random affine jitter shrinks (2.56 -> 0.96 px) while the elastic field (sub-pixel)
    # grows: the distance falls with severity; s1 > s3 > s5 and s4 > s5 always.
    "elastic_transform": [(3, 1), (5, 3), (5, 4)],
}


def test_registry_is_the_benchmark_order() -> None:
    assert list(CORRUPTIONS) == [
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    ]  # fmt: skip
    assert set(ORDER) == set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_and_keeps_shape(name: str, images: np.ndarray) -> None:
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images)
        np.testing.assert_array_equal(out, corrupt(images, name, severity, seed=0))
        other_seed = corrupt(images, name, severity, seed=1)
        assert np.array_equal(out, other_seed) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_does_not_depend_on_chunking(name: str, images: np.ndarray) -> None:
    whole = corrupt(images, name, 3, seed=7)
    chunks = [corrupt(images[:5], name, 3, seed=7), corrupt(images[5:], name, 3, seed=7, start=5)]
    np.testing.assert_array_equal(whole, np.concatenate(chunks))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_increases_distance(name: str, images: np.ndarray) -> None:
    clean = images.astype(np.float64)
    distance = {s: np.abs(corrupt(images, name, s, seed=0) - clean).mean() for s in SEVERITIES}
    for a, b in ORDER[name]:
        assert distance[a] < distance[b], (a, b, distance)


def test_unknown_corruption_lists_the_valid_names(images: np.ndarray) -> None:
    with pytest.raises(UnknownCorruptionError, match="Unknown corruption 'rain'; valid: gaussian"):
        corrupt(images, "rain", 1)


@pytest.mark.parametrize("severity", [0, 6])
def test_severity_out_of_range_is_refused(images: np.ndarray, severity: int) -> None:
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "fog", severity)


def test_motion_kernel_is_a_one_sided_half_gaussian() -> None:
    radius, sigma = 6, 2.0
    taps = np.exp(-(np.arange(2 * radius + 1) ** 2) / (2 * sigma**2))
    centre = 2 * radius
    horizontal = corruptions._motion_kernel(radius, sigma, 0.0)
    np.testing.assert_allclose(horizontal[centre, centre:], taps / taps.sum(), rtol=1e-6)
    assert horizontal.sum() == pytest.approx(1) and horizontal[:, :centre].sum() == 0
    # 90 degrees points down the image (y grows downwards).
    np.testing.assert_allclose(
        corruptions._motion_kernel(radius, sigma, 90.0), horizontal.T, atol=1e-7
    )


def test_plasma_fractal_spans_zero_to_one_and_follows_the_seed() -> None:
    plasma = plasma_fractal(np.random.default_rng(0), 32, decay=2.0)
    assert plasma.shape == (32, 32) and plasma.min() == 0 and plasma.max() == 1
    np.testing.assert_array_equal(plasma, plasma_fractal(np.random.default_rng(0), 32, 2.0))
    # A slower decay keeps more fine detail: neighbouring values differ more.
    rough = plasma_fractal(np.random.default_rng(0), 32, decay=1.5)
    smooth = plasma_fractal(np.random.default_rng(0), 32, decay=4.0)
    assert np.abs(np.diff(rough)).mean() > np.abs(np.diff(smooth)).mean()


def test_frost_textures_match_the_reference_statistics() -> None:
    textures = frost_textures()
    assert textures is frost_textures()  # built once
    for texture, (mean, std) in zip(textures, corruptions._FROST_STATS, strict=True):
        assert texture.shape == (96, 128, 3) and texture.dtype == np.uint8
        np.testing.assert_allclose(texture.mean(axis=(0, 1)), mean, atol=3)
        np.testing.assert_allclose(texture.std(axis=(0, 1)), std, rtol=0.15)
