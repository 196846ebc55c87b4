"""Dynamic-resolution tiling (InternVL 1.5–3): an image becomes a grid of square tiles plus a thumbnail.

    image (W×H) ──closest grid (c cols, r rows), min ≤ c·r ≤ max──► resize to (tile·c, tile·r), bicubic
        │                                                          │
        │                                                          └─► crop row-major: c·r tiles
        └─► resize to (tile, tile) ─► thumbnail, appended when c·r > 1

A sample's images share one tile budget (each gets ``max(1, max_tiles // n_images)``, as InternVL's
``max_dynamic_patch // num_image``); video frames get one tile each. transformers' GotOcr2 image
processor implements the same rule, and ``tests/test_tiling.py`` compares against it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lit_internvl.data.images import to_tensor

# InternVL's RandomJPEG augmentation draws a quality uniformly from 75..100 (both ends included).
INTERNVL_JPEG_QUALITY = (75, 100)

Grid = tuple[int, int]  # (cols, rows)
Rng = random.Random | np.random.Generator


def target_grids(min_tiles: int = 1, max_tiles: int = 12) -> list[Grid]:
    """All grids ``(cols, rows)`` with ``min_tiles ≤ cols·rows ≤ max_tiles``, sorted by tile count.

    Within one tile count the order is cols-major (``(1, 2)`` before ``(2, 1)``), the order of
    transformers' GotOcr2 processor. InternVL's reference sorts a Python ``set``, whose order within
    one tile count differs; the two orders give the same grid for every image when ``min_tiles == 1``
    (no two grids with equal tile count can then tie as closest; ``test_tiling`` proves it), and
    can differ only on exact ties when ``min_tiles > 1``.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"Need 1 ≤ min_tiles ≤ max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable: keeps cols-major order within a count


def closest_grid(width: int, height: int, grids: Sequence[Grid], tile_size: int = 448) -> Grid:
    """The grid whose aspect ratio ``cols/rows`` is closest to ``width/height``.

    On a tie the later grid in ``grids`` (more tiles) wins if the image area exceeds half the area of
    that grid's canvas, ``width·height > 0.5·tile²·cols·rows``: a small image is not blown up to many
    tiles. An empty ``grids`` gives ``(1, 1)``, as in InternVL.
    """
    if width < 1 or height < 1:
        raise ValueError(f"Image size must be positive, got width={width}, height={height}")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(
    width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = True
) -> int:
    """How many tiles :func:`dynamic_tiles` makes for a ``width × height`` image, without touching pixels."""
    cols, rows = closest_grid(width, height, target_grids(min_tiles, max_tiles), tile_size)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def dynamic_tiles(
    image: Image.Image,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split one image into ``cols·rows`` RGB tiles of ``tile_size × tile_size`` (row-major).

    Returns ``cols·rows`` tiles, plus a thumbnail (the whole image resized to one tile) at the end when
    ``use_thumbnail`` and there is more than one tile: 1 or ``cols·rows + 1`` images.
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    cols, rows = closest_grid(image.width, image.height, target_grids(min_tiles, max_tiles), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def jpeg_reencode(image: Image.Image, rng: Rng, quality: tuple[int, int] = INTERNVL_JPEG_QUALITY) -> Image.Image:
    """Re-encode as JPEG at a quality drawn uniformly from ``quality`` (both ends included) by ``rng``.

    InternVL's training augmentation (``RandomJPEG``); ``rng`` is a ``random.Random`` or a numpy
    ``Generator``, so the result is a pure function of the generator's state.
    """
    low, high = quality
    if not 1 <= low <= high <= 100:
        raise ValueError(f"JPEG quality range must satisfy 1 ≤ low ≤ high ≤ 100, got {quality}")
    q = rng.randint(low, high) if isinstance(rng, random.Random) else int(rng.integers(low, high + 1))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=q)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _tile_range(n_images: int, max_tiles: int, min_tiles: int, is_video: bool) -> tuple[int, int]:
    """``(min, max)`` tiles for each image of a sample of ``n_images`` sharing ``max_tiles``."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be ≥ 1, got {max_tiles}")
    share = 1 if is_video else max(1, max_tiles // n_images)
    return (min_tiles, share) if min_tiles <= share else (1, 1)


def sample_tile_counts(
    sizes: Sequence[tuple[int, int]],
    tile_size: int = 448,
    max_tiles: int = 12,
    is_video: bool = False,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
) -> list[int]:
    """``tiles_per_image`` that :func:`tile_sample` returns for images of these ``(width, height)``
    sizes, computed without pixels (to count a sample's image tokens before decoding it)."""
    if not sizes:
        return []
    low, high = _tile_range(len(sizes), max_tiles, min_tiles, is_video)
    return [num_tiles(w, h, tile_size, low, high, use_thumbnail) for w, h in sizes]


def tile_sample(
    images: Sequence[Image.Image],
    tile_size: int = 448,
    max_tiles: int = 12,
    is_video: bool = False,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
    jpeg_quality: tuple[int, int] | None = None,
    rng: Rng | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Tile all images of one sample → ``pixel_values (T, 3, tile, tile)``, ``tiles_per_image`` (sums to T).

    - Images share the budget: each may use ``max(1, max_tiles // len(images))`` tiles (plus its
      thumbnail). If ``min_tiles`` exceeds that share, the image gets a single tile, as InternVL's
      empty grid list gives ``(1, 1)``.
    - Video frames (``is_video``) get one tile each: the frame resized to ``tile × tile``.
    - ``jpeg_quality`` (e.g. :data:`INTERNVL_JPEG_QUALITY`) turns on JPEG re-encoding, drawn by ``rng``
      for each tile independently — InternVL applies its ``RandomJPEG`` in the per-tile transform,
      which also bounds the cost for very large images. Off by default.

    Tiles are normalised with ImageNet mean/std (:func:`lit_internvl.data.images.to_tensor`).
    """
    if jpeg_quality is not None and rng is None:
        raise ValueError("jpeg_quality is set but rng is None; pass a random.Random or numpy Generator")
    if not images:
        return torch.empty(0, 3, tile_size, tile_size), []
    low, high = _tile_range(len(images), max_tiles, min_tiles, is_video)
    tiles: list[Image.Image] = []
    tiles_per_image: list[int] = []
    for image in images:
        image_tiles = dynamic_tiles(image, tile_size, low, high, use_thumbnail)
        tiles.extend(image_tiles)
        tiles_per_image.append(len(image_tiles))
    if jpeg_quality is not None:
        tiles = [jpeg_reencode(tile, rng, jpeg_quality) for tile in tiles]
    return torch.stack([to_tensor(tile) for tile in tiles]), tiles_per_image
