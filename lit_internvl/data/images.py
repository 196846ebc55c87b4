"""Images: safe decoding of untrusted files (:func:`open_image`) and image → tensor (RGB, ImageNet
normalisation, what InternViT was trained with).

:func:`open_image` reads only the header before it decides to decode, so a decompression bomb (a
20,000 × 20,000 PNG of 1 MB) is refused by its size, not by the memory it would take. Every way a
file can fail to become an image raises :class:`UnusableImage` with a short reason, which the
record layer turns into a named, counted bad record:

==========================  ======================================================================
reason                      when
==========================  ======================================================================
``empty image file``        the file has zero bytes
``not an image``            the bytes are none of :data:`IMAGE_FORMATS` (text, a PDF, an EPS, …)
``image too large``         width × height exceeds the pixel limit (checked on the header)
``too many frames``         an animated or multi-page file (GIF, APNG, WebP, TIFF)
``truncated image``         the file ends before its pixel data does
``corrupt image``           any other decoding failure (a broken data stream, a bad header)
==========================  ======================================================================
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The formats training images come in. Others are refused unread: some of PIL's plugins run external
# programs (EPS starts Ghostscript) or parse rarely tested layouts, a poor match for untrusted files.
# PIL's JPEG reader also returns MPO, the multi-picture JPEG that phone cameras write (the photo,
# then a preview or a depth map).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# PIL's own decompression-bomb threshold (PIL warns above it and refuses above twice it): our default.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485


class UnusableImage(ValueError):
    """A file that cannot become an image; ``reason`` is one of the reasons in the module's table."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@contextmanager
def _our_pixel_limit():
    """Lift PIL's process-wide bomb check while one file opens: :func:`open_image` applies its own
    limit, which may be set above PIL's. Data loading runs one image at a time per process."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_image(source: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one still image (a path or encoded bytes) → RGB PIL image.

    Checks, in order and before any pixel is decoded: the file is not empty, its header is one of
    :data:`IMAGE_FORMATS`, ``width × height ≤ max_pixels`` (None: no limit), it has one frame. Then it
    decodes. Raises :class:`UnusableImage` (reason from the module's table) or ``FileNotFoundError``.
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    if not data:
        raise UnusableImage("empty image file", "0 bytes")
    Image.init()  # registers every plugin once (WebP, TIFF are not among PIL's preloaded few)
    try:
        with _our_pixel_limit():
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnusableImage("not an image", f"{len(data)} bytes, none of {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as error:  # a header PIL recognised but could not parse
        raise UnusableImage("corrupt image", str(error)) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise UnusableImage("image too large", f"{width}×{height} = {width * height:,} pixels > limit {max_pixels:,}")
    # A photo's MPO preview is not a second frame of the picture; an animation's frames are.
    if image.format != "MPO" and getattr(image, "is_animated", False):
        frames = getattr(image, "n_frames", "several")
        raise UnusableImage("too many frames", f"{image.format} with {frames} frames; an image is one frame")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        # PIL says "image file is truncated" when the data ends early (ImageFile.LOAD_TRUNCATED_IMAGES off).
        reason = "truncated image" if "truncated" in str(error).lower() else "corrupt image"
        raise UnusableImage(reason, str(error)) from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image → normalised float tensor ``(3, H, W)``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
