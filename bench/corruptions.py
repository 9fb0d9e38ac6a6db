"""The 15 benchmark corruptions of CIFAR-10-C, for 32x32 RGB uint8 images.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019. The severity parameters are those of the authors' CIFAR script
(hendrycks/robustness, `ImageNet-C/create_c/make_cifar_c.py`, commit 8190fe3); the code is our
own, on OpenCV, SciPy, scikit-image and Pillow primitives. Deviations from that script:

- Motion blur (also the streaks of `snow`) used ImageMagick's MotionBlurImage; here it is an OpenCV
  line kernel with ImageMagick's semantics: 2 * radius + 1 taps along `angle` (degrees, image
  coordinates, y down), one-sided half-Gaussian weights exp(-i^2 / (2 sigma^2)) normalised to sum
  1, tap i at offset (ceil(i cos a - 0.5), ceil(i sin a - 0.5)), edge pixels replicated past the
  border (ImageMagick's default virtual pixels), result rounded to 8 bits as its PNG output was.
- Frost blended random crops of five frost photographs; here five procedural textures (smoothed
  noise at three scales plus thin bright ice-crystal streaks) with the per-channel mean and
  standard deviation measured on those photographs after the script's 0.2x resize, built once
  from a fixed seed and cropped at random per image, with the script's blend weights.
- Randomness comes from the `rng` argument instead of NumPy's global state.

Quirks of the script that define the released data and are kept: glass blur copies (not swaps)
each pixel from a neighbour offset by -1 or 0 per axis (see `glass_blur`); the zoom factors of
zoom blur come from a float `np.arange`, hence 7, 12, 16, 21 and 26 factors; the plasma fractal of
fog perturbs each level by U(-w^2, w^2) (w = wibble), so its amplitude falls by decay^2 per level;
floats become uint8 by truncation, like the script's final `np.uint8`.
"""

import functools
from collections.abc import Callable
from io import BytesIO

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color, filters, util

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

SEVERITIES = (1, 2, 3, 4, 5)


class UnknownCorruptionError(ValueError):
    """A corruption name that is not in `CORRUPTIONS`; the message lists the valid names."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")


def _float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255


def _uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, truncating like the reference's final `np.uint8`."""
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------- noise


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, std 0.04 to 0.10 of the intensity range."""
    std = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    x = _float(image)
    return _uint8(x + rng.normal(scale=std, size=x.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson (photon) noise: intensities become Poisson counts at 500 to 50 photons per unit."""
    photons = (500, 250, 100, 75, 50)[severity - 1]
    return _uint8(rng.poisson(_float(image) * photons) / photons)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise on 1% to 7% of the values (each channel independently)."""
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    return _uint8(util.random_noise(_float(image), mode="s&p", amount=amount, rng=rng))


# ----------------------------------------------------------------------------------------- blur


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Normalised disk of `radius` pixels, anti-aliased by a 3x3 Gaussian of std `alias_blur`."""
    # Two pixels of margin, so the 3x3 blur never reflects disk weight back in at the border.
    half = int(np.ceil(radius)) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    return cv2.GaussianBlur(disk / disk.sum(), (3, 3), alias_blur)


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Convolution with an anti-aliased disk (radius 0.3 to 1.5 pixels)."""
    radius, alias_blur = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]
    return _uint8(cv2.filter2D(_float(image), -1, _disk_kernel(radius, alias_blur)))


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, displace pixels locally (frosted glass), blur again."""
    sigma, delta, iterations = (
        (0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)
    )[severity - 1]  # fmt: skip
    x = _uint8(filters.gaussian(_float(image), sigma=sigma, channel_axis=-1))
    h, w = x.shape[:2]
    # The reference means to swap every pixel (rows, columns delta+1 .. side-delta) with a neighbour
    # offset by randint(-delta, delta), i.e. by -1 or 0, per axis. Its tuple swap of NumPy views
    # only copies the neighbour into the pixel, and as it walks from the bottom-right corner up
    # and left it only ever reads pixels it has not written yet: in effect every such pixel takes
    # the value of a random neighbour in one simultaneous gather, done here per iteration.
    rows, cols = np.mgrid[delta + 1 : h - delta + 1, delta + 1 : w - delta + 1]
    for _ in range(iterations):
        dy, dx = rng.integers(-delta, delta, size=(2, *rows.shape))
        x[rows, cols] = x[rows + dy, cols + dx]
    return _uint8(filters.gaussian(x / 255, sigma=sigma, channel_axis=-1))


def _motion_kernel(radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion-blur kernel as a 2-D correlation kernel for `cv2.filter2D`."""
    taps = np.arange(2 * radius + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    theta = np.deg2rad(angle)
    dx = np.ceil(taps * np.cos(theta) - 0.5).astype(int)
    dy = np.ceil(taps * np.sin(theta) - 0.5).astype(int)
    centre = len(taps) - 1
    kernel = np.zeros((2 * centre + 1, 2 * centre + 1), np.float32)
    np.add.at(kernel, (centre + dy, centre + dx), weights / weights.sum())  # taps can coincide
    return kernel


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """One-sided motion blur of a float32 image (see the module docstring), rounded to 8 bits."""
    blurred = cv2.filter2D(
        x, -1, _motion_kernel(radius, sigma, angle), borderType=cv2.BORDER_REPLICATE
    )
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Motion blur along a random direction within 45 degrees of horizontal."""
    radius, sigma = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[severity - 1]
    return _motion_blur(image.astype(np.float32), radius, sigma, rng.uniform(-45, 45))


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of `x` (H, W[, C]) by `factor` (bilinear) and crop back to H x W."""
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top : top + ch, left : left + cw]
    zoomed = ndimage.zoom(crop, (factor, factor) + (1,) * (x.ndim - 2), order=1)
    top, left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[top : top + h, left : left + w]


# Float arange, as in the reference: the endpoints 1.06 and 1.11 are included, the others not.
_ZOOM_FACTORS = tuple(np.arange(1, end, 0.01) for end in (1.06, 1.11, 1.16, 1.21, 1.26))


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Average of the image and its centre zoomed by 1.00 up to 1.06-1.25 in steps of 0.01."""
    x = _float(image)
    factors = _ZOOM_FACTORS[severity - 1]
    total = x + sum(_clipped_zoom(x, f) for f in factors)
    return _uint8(total / (len(factors) + 1))


# -------------------------------------------------------------------------------------- weather

# (mean, std, zoom, threshold, blur radius, blur sigma, image weight) of the snow layer
_SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Falling snow: thresholded noise motion-blurred into streaks over a whitened image."""
    mean, std, zoom, threshold, radius, sigma, weight = _SNOW[severity - 1]
    x = _float(image)
    flakes = _clipped_zoom(rng.normal(mean, std, size=x.shape[:2]), zoom)
    flakes[flakes < threshold] = 0
    # The reference blurs an 8-bit greyscale picture of the flakes.
    flakes = _uint8(flakes).astype(np.float32)
    streaks = _motion_blur(flakes, radius, sigma, rng.uniform(-135, -45))[..., None] / 255
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = weight * x + (1 - weight) * np.maximum(x, grey * 1.5 + 0.5)
    return _uint8(x + streaks + np.rot90(streaks, 2))


# Per-channel (mean, std) of the reference's five frost photographs after their 0.2x resize
# (frost2.png and frost3.png hold the same pixels, so that look is drawn twice as often).
_FROST_STATS = (
    ((78, 149, 166), (27, 16, 15)),
    ((201, 205, 215), (21, 22, 23)),
    ((201, 205, 215), (21, 22, 23)),
    ((138, 153, 166), (29, 29, 30)),
    ((112, 123, 135), (44, 43, 42)),
)
_FROST_SEED = 20190506  # fixed: the textures are part of the benchmark's definition


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def _frost_texture(rng: np.random.Generator, mean: tuple, std: tuple) -> np.ndarray:
    """A 96x128 RGB frost texture: grain, patches and ice-crystal needles with given statistics."""
    shape = (96, 128)
    # Grain (sigma 0.7), frozen patches (2.5) and uneven cover (10), like the photographs.
    field = sum(
        weight * _standardise(ndimage.gaussian_filter(rng.standard_normal(shape), s, mode="wrap"))
        for s, weight in ((0.7, 1.0), (2.5, 0.7), (10, 0.7))
    )
    # Needles: short bright anti-aliased segments with two side branches each.
    needles = np.zeros(shape, np.float32)
    for _ in range(shape[0] * shape[1] // 60):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        angle, length, bright = rng.uniform(0, np.pi), rng.uniform(2, 7), rng.uniform(0.5, 1)
        for a, ln in ((angle, length), (angle + 1, length / 2), (angle - 1, length / 2)):
            end = (x + ln * np.cos(a), y + ln * np.sin(a))
            # cv2 draws at integer coordinates; shift=4 gives 1/16-pixel precision
            p0 = (int(x * 16), int(y * 16))  # truncation toward zero, as np.int32
            p1 = (int(end[0] * 16), int(end[1] * 16))
            cv2.line(needles, p0, p1, bright, 1, cv2.LINE_AA, 4)
    field = _standardise(field + 2.5 * needles)
    texture = np.asarray(mean) + np.asarray(std) * field[..., None]
    return np.clip(texture, 0, 255).astype(np.uint8)


@functools.cache
def frost_textures() -> tuple[np.ndarray, ...]:
    """The five procedural frost textures (uint8 [96, 128, 3]), built once from a fixed seed."""
    rng = np.random.default_rng(_FROST_SEED)
    return tuple(_frost_texture(rng, mean, std) for mean, std in _FROST_STATS)


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Ice on a window: a random crop of a frost texture blended over the (darkened) image."""
    image_weight, frost_weight = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[
        severity - 1
    ]
    textures = frost_textures()
    texture = textures[rng.integers(len(textures))]
    h, w = image.shape[:2]
    top, left = rng.integers(texture.shape[0] - h), rng.integers(texture.shape[1] - w)
    crop = texture[top : top + h, left : left + w].astype(np.float32)
    return np.clip(image_weight * image + frost_weight * crop, 0, 255).astype(np.uint8)


def plasma_fractal(rng: np.random.Generator, size: int = 32, decay: float = 3.0) -> np.ndarray:
    """Diamond-square plasma fractal on a torus of side `size` (a power of two), scaled to [0, 1].

    Each level sets the centre of every square to the mean of its 4 corners, then the midpoint of
    every edge to the mean of its 4 diamond neighbours (2 corners, 2 centres), each plus uniform
    noise; the noise amplitude starts at 100^2 and is divided by decay^2 per level (see module
    docstring).
    """
    grid = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[::step, ::step]
        right, below = np.roll(corners, -1, 1), np.roll(corners, -1, 0)
        square = (corners + right + below + np.roll(below, -1, 1)) / 4
        grid[half::step, half::step] = square + rng.uniform(-1, 1, square.shape) * wibble**2
        centres = grid[half::step, half::step]
        # Edge midpoints on the corner rows sit between centres (i - 1, j) and (i, j); those on
        # the corner columns between centres (i, j - 1) and (i, j).
        top = (corners + right + centres + np.roll(centres, 1, 0)) / 4
        grid[::step, half::step] = top + rng.uniform(-1, 1, top.shape) * wibble**2
        left = (corners + below + centres + np.roll(centres, 1, 1)) / 4
        grid[half::step, ::step] = left + rng.uniform(-1, 1, left.shape) * wibble**2
        step, wibble = half, wibble / decay
    grid -= grid.min()
    return grid / grid.max()


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Fog: a plasma fractal added to the image, rescaled to keep its peak intensity."""
    strength, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    x = _float(image)
    peak = x.max()
    h, w = x.shape[:2]
    # The reference draws a 32x32 fractal and crops it to the image.
    side = max(32, 1 << (max(h, w) - 1).bit_length())
    haze = plasma_fractal(rng, side, decay)[:h, :w, None]
    return _uint8((x + strength * haze) * peak / (peak + strength))


# ------------------------------------------------------------------------------------- digital


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Brighter: HSV value raised by 0.05 to 0.3."""
    delta = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    hsv = color.rgb2hsv(_float(image))
    hsv[..., 2] = np.clip(hsv[..., 2] + delta, 0, 1)
    return _uint8(color.hsv2rgb(hsv))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Lower contrast: deviations from each channel's mean scaled by 0.75 down to 0.15."""
    factor = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    x = _float(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _uint8((x - mean) * factor + mean)


# (displacement scale alpha, displacement smoothing sigma, affine jitter) in pixels, as multiples
# of the image side 32 like in the reference.
_ELASTIC = tuple(
    (32 * a, 32 * s, 32 * j)
    for a, s, j in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                    (0.1, 0.03, 0.03))
)  # fmt: skip


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp followed by a smooth random displacement field (bilinear)."""
    alpha, sigma, jitter = _ELASTIC[severity - 1]
    x = _float(image)
    h, w = x.shape[:2]
    # Affine: jitter three points around the centre by up to `jitter` pixels each.
    c, d = h // 2, min(h, w) // 3
    anchors = np.array([[c + d, c + d], [c + d, c - d], [c - d, c - d]], dtype=np.float32)
    moved = anchors + rng.uniform(-jitter, jitter, size=anchors.shape).astype(np.float32)
    affine = cv2.getAffineTransform(anchors, moved)
    x = cv2.warpAffine(x, affine, (w, h), borderMode=cv2.BORDER_REFLECT_101)
    # Elastic: uniform noise smoothed by a Gaussian (truncated at 3 sigma), scaled by alpha.
    dx, dy = (
        alpha * filters.gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3)
        for _ in range(2)
    )
    rows, cols = np.mgrid[:h, :w]
    coords = [rows + dy, cols + dx]
    channels = [
        ndimage.map_coordinates(x[..., k], coords, order=1, mode="reflect")
        for k in range(x.shape[2])
    ]
    return _uint8(np.stack(channels, axis=-1))


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample to 0.95-0.65 of the side and box-upsample back."""
    factor = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((int(w * factor), int(h * factor)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX))


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG round trip at quality 80 down to 40 (Pillow's default 4:2:0 chroma subsampling)."""
    quality = (80, 65, 58, 50, 40)[severity - 1]
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


# ------------------------------------------------------------------------------------- registry

# In the benchmark's order (the order of the paper and of the released CIFAR-10-C files).
CORRUPTIONS: dict[str, Corruption] = {
    fn.__name__: fn
    for fn in (
        gaussian_noise, shot_noise, impulse_noise,
        defocus_blur, glass_blur, motion_blur, zoom_blur,
        snow, frost, fog,
        brightness, contrast, elastic_transform, pixelate, jpeg_compression,
    )
}  # fmt: skip


def get_corruption(name: str) -> Corruption:
    """The corruption function registered under `name`; raises UnknownCorruptionError."""
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise UnknownCorruptionError(name) from None


def image_rng(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a data set corrupted by (`name`, `severity`, `seed`)."""
    corruption_index = list(CORRUPTIONS).index(name)
    return np.random.default_rng(np.random.SeedSequence([seed, corruption_index, severity, index]))


def corrupt(
    images: np.ndarray, name: str, severity: int, seed: int = 0, *, start: int = 0
) -> np.ndarray:
    """Apply corruption `name` at `severity` (1-5) to uint8 images [N, H, W, 3].

    Image i draws its randomness from its own generator, seeded from (seed, corruption index,
    severity, start + i), so the output does not depend on how a data set is cut into chunks or
    processes: pass the index of the chunk's first image as `start`.

    Example:
        >>> foggy = corrupt(images, "fog", severity=5, seed=0)
    """
    fn = get_corruption(name)
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = fn(image, severity, image_rng(seed, name, severity, start + i))
    return out
