"""Safe decoding of request images and raw tensors into the model's input batch.

Images (JPEG, PNG, WebP) are checked against a byte limit before Pillow sees them and against a
pixel limit after Pillow has read only the header, so a decompression bomb (a small file that
declares a huge image) is refused before a single pixel is decoded. Truncated or corrupt files are
refused (``LOAD_TRUNCATED_IMAGES`` stays off, and a PNG's image data must hold every row: Pillow
zero-fills the rows of a zlib stream that ends early). Raw tensors are uint8 pixels (0-255) or
float32 inputs that are already normalised, finite, and inside the model's input range
(``ModelSpec.input_range``); their shape must be exactly the model's input.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from models import ModelSpec, pil_to_uint8
from service.errors import InvalidImageError, InvalidTensorError, PayloadTooLargeError

FORMATS = ("JPEG", "PNG", "WEBP")
# Modes that convert to RGB without guessing; 16-bit and float images have no agreed scaling.
CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"})
DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


@dataclass(frozen=True)
class ImageBatch:
    """A request's images as one batch: uint8 pixels, or float32 inputs already normalised."""

    tensor: torch.Tensor  # [N, 3, H, W], uint8 or float32, on the CPU

    @property
    def count(self) -> int:
        """Number of images."""
        return int(self.tensor.shape[0])

    @property
    def normalized(self) -> bool:
        """Whether the tensor is the model's float input (else uint8 pixels to normalise)."""
        return self.tensor.dtype == torch.float32


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode one JPEG/PNG/WebP file into an RGB image, refusing anything unsafe or unusable.

    Raises:
        PayloadTooLargeError: more than ``max_bytes`` bytes, or more than ``max_pixels`` pixels.
        InvalidImageError: empty, not a JPEG/PNG/WebP file, truncated or corrupt, or a mode
            (16-bit, float) that has no agreed conversion to 8-bit RGB.
    """
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data:
        raise InvalidImageError("image is empty")
    try:
        # Pillow's own guard raises for images over 2 x Image.MAX_IMAGE_PIXELS; ours follows.
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise InvalidImageError("cannot decode image: not a JPEG, PNG or WebP file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            f"cannot decode image: the file is truncated or corrupt ({error})"
        ) from None
    width, height = image.size
    # The header has been read, no pixel yet: refuse bombs before decoding.
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has an empty size {width}x{height}")
    if image.mode not in CONVERTIBLE_MODES:
        raise InvalidImageError(
            f"unsupported image mode {image.mode!r}: send 8-bit RGB, RGBA, grayscale or "
            "palette images"
        )
    try:
        image.load()
        if image.format == "PNG":
            check_png_data(data)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidImageError(
            f"cannot decode {image.format} image: the file is truncated or corrupt ({error})"
        ) from None
    return image.convert("RGB")


# PNG color type -> samples per pixel (gray, RGB, palette, gray + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip


def check_png_data(data: bytes) -> None:
    """Raise ValueError unless the PNG's image data decompresses to exactly every row.

    Pillow zero-fills the rows missing when the zlib stream of the IDAT chunks ends early
    (a truncated file re-wrapped in valid chunks), so it cannot tell a complete image from a
    cut one; this recomputes the size the header promises and inflates the data to check it.
    The header was checked against the pixel limit first, so the inflation is bounded.
    """
    width, height, depth, color_type, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    bits = _PNG_CHANNELS[color_type] * depth

    def size(columns: int, rows: int) -> int:  # one filter byte per row, then packed samples
        return 0 if columns == 0 or rows == 0 else rows * (1 + (columns * bits + 7) // 8)

    if interlace:
        expected = sum(
            size(-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in _ADAM7
        )
    else:
        expected = size(width, height)
    inflater = zlib.decompressobj()
    produced, position = 0, 8
    # Stop one byte past the promise: max_length 0 would mean "no limit" to zlib.
    while position + 8 <= len(data) and not inflater.eof and produced <= expected:
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":
            chunk = data[position + 8 : position + 8 + length]
            try:
                produced += len(inflater.decompress(chunk, expected + 1 - produced))
            except zlib.error as error:
                raise ValueError(f"its image data is not a valid zlib stream: {error}") from None
        position += 12 + length
    if produced != expected or not inflater.eof:
        raise ValueError(
            f"its image data holds {produced} of the {expected} bytes that its "
            f"{width}x{height} header promises"
        )


def decode_images(
    files: Sequence[bytes], spec: ModelSpec, *, max_bytes: int, max_pixels: int
) -> ImageBatch:
    """Decode encoded images into the model's uint8 input batch (resized to its input size).

    An error names the failing image by its position (``image 2: ...``).
    """
    tensors = []
    for index, data in enumerate(files):
        try:
            image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
        except (InvalidImageError, PayloadTooLargeError) as error:
            error.message = f"image {index}: {error.message}"
            error.args = (error.message,)
            raise
        tensors.append(pil_to_uint8(image, spec))
    return ImageBatch(torch.stack(tensors))


def parse_shape(text: str) -> list[int]:
    """``"4,3,32,32"`` (or ``"[4, 3, 32, 32]"``) as a list of ints; InvalidTensorError if not."""
    parts = [part.strip() for part in text.strip().strip("[]()").split(",") if part.strip()]
    try:
        shape = [int(part) for part in parts]
    except ValueError:
        raise InvalidTensorError(
            f"invalid tensor shape {text!r}: expected comma-separated integers like 1,3,32,32"
        ) from None
    if not shape:
        raise InvalidTensorError("tensor shape is empty: expected N,3,H,W")
    return shape


def check_shape(shape: Sequence[int], spec: ModelSpec, max_images: int) -> tuple[int, ...]:
    """The batch shape ``(N, 3, H, W)`` for ``spec``, from ``[N, 3, H, W]`` or ``[3, H, W]``."""
    height, width = spec.input_size
    full = tuple(shape) if len(shape) == 4 else (1, *shape) if len(shape) == 3 else None
    if full is None or full[1:] != (3, height, width) or full[0] < 1:
        raise InvalidTensorError(
            f"tensor shape {list(shape)} does not fit model {spec.name}: "
            f"expected [N, 3, {height}, {width}] with N >= 1"
        )
    if full[0] > max_images:
        raise PayloadTooLargeError(f"{full[0]} images in one request; the limit is {max_images}")
    return full


def decode_tensor(
    data: bytes | bytearray | memoryview,
    shape: Sequence[int],
    dtype: str,
    spec: ModelSpec,
    *,
    max_images: int,
    margin: float,
) -> ImageBatch:
    """A raw little-endian tensor (uint8 pixels or normalised float32) as the input batch.

    ``margin`` widens the model's input range for float32 inputs (see `bounded_batch`).
    """
    torch_dtype = tensor_dtype(dtype)
    full = check_shape(shape, spec, max_images)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(full) * itemsize
    if len(data) != expected:
        raise InvalidTensorError(
            f"tensor data is {len(data)} bytes; shape {list(shape)} of {dtype} needs "
            f"{expected} bytes"
        )
    tensor = torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(full)
    return bounded_batch(tensor, spec, margin)


def tensor_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an API dtype name (``uint8`` or ``float32``), or InvalidTensorError."""
    torch_dtype = DTYPES.get(dtype.lower())
    if torch_dtype is None:
        raise InvalidTensorError(
            f"unsupported tensor dtype {dtype!r}: expected one of {', '.join(DTYPES)}"
        )
    return torch_dtype


def tensor_from_list(
    values: list,
    shape: Sequence[int],
    dtype: str,
    spec: ModelSpec,
    *,
    max_images: int,
    margin: float,
) -> ImageBatch:
    """A tensor given as (flat or nested) JSON numbers, as the input batch (see `decode_tensor`)."""
    torch_dtype = tensor_dtype(dtype)
    full = check_shape(shape, spec, max_images)
    try:
        tensor = torch.tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidTensorError(f"tensor data is not a list of numbers: {error}") from None
    if tensor.numel() != math.prod(full):
        raise InvalidTensorError(
            f"tensor data has {tensor.numel()} values; shape {list(shape)} needs {math.prod(full)}"
        )
    if torch_dtype == torch.uint8:
        if not torch.isfinite(tensor).all() or (tensor != tensor.round()).any():
            raise InvalidTensorError("uint8 tensor data must be integers in 0..255")
        if (tensor < 0).any() or (tensor > 255).any():
            raise InvalidTensorError("uint8 tensor data must be integers in 0..255")
    else:  # bounds checked on the float64 values: 1e39 reads as out of range, not as inf
        bounded_batch(tensor.reshape(full), spec, margin)
    return ImageBatch(tensor.to(torch_dtype).reshape(full).contiguous())


def bounded_batch(tensor: torch.Tensor, spec: ModelSpec, margin: float) -> ImageBatch:
    """Wrap a batch, refusing float inputs that are NaN, infinite or outside the input range.

    The range is ``spec.input_range(margin)`` per channel: the normalised pixel range [0, 1]
    widened ``margin`` times. A finite but huge value (3e38) would otherwise overflow the
    stream's BatchNorm moments and poison its statistics for good. uint8 pixels are bounded
    by their type.
    """
    if not tensor.dtype.is_floating_point:
        return ImageBatch(tensor.contiguous())
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidTensorError("tensor holds NaN or infinite values")
    lows, highs = spec.input_range(margin)
    per_channel = tensor.transpose(0, 1).reshape(3, -1)
    smallest, largest = per_channel.amin(1).tolist(), per_channel.amax(1).tolist()
    for channel, (low, high) in enumerate(zip(lows, highs, strict=True)):
        # A pixel normalised in float32 may land an ulp outside the exact (float64) bounds.
        slack = 1e-5 * max(abs(low), abs(high))
        if smallest[channel] < low - slack or largest[channel] > high + slack:
            value = smallest[channel] if smallest[channel] < low - slack else largest[channel]
            raise InvalidTensorError(
                f"tensor value {value:.6g} in channel {channel} is outside model {spec.name}'s "
                f"input range [{low:.4g}, {high:.4g}]: float32 inputs are normalised pixels "
                f"((pixel - mean) / std with pixels in [0, 1]), allowed {margin:g} times that "
                "range (input_range_margin)"
            )
    return ImageBatch(tensor.contiguous())
