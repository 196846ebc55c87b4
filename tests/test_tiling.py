"""Dynamic tiling is InternVL's: same grids and pixels as transformers' GotOcr2 processor, same budgets."""

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GotOcr2ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from lit_internvl.data.images import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from lit_internvl.data.tiling import (
    INTERNVL_JPEG_QUALITY,
    closest_grid,
    dynamic_tiles,
    jpeg_reencode,
    num_tiles,
    sample_tile_counts,
    target_grids,
    tile_sample,
)

EXTREME_SIZES = [
    (1, 1), (2, 1), (1, 2), (1, 2000), (2000, 1), (3000, 20), (20, 3000), (5, 3), (7, 450), (448, 448),
    (449, 448), (633, 633), (634, 634), (896, 448), (1, 40), (40, 1), (4000, 4000), (13, 12), (5, 2),
]  # fmt: skip
CONFIGS = [(1, 12, 448), (1, 6, 448), (1, 1, 448), (1, 4, 224), (2, 8, 448), (4, 4, 448), (6, 6, 32), (1, 40, 64)]


def random_sizes(n: int, seed: int, max_side: int = 4000) -> list[tuple[int, int]]:
    """Log-uniform sides, so thin strips, tiny images and big photos all appear."""
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(0, np.log(max_side), size=(n, 2))).astype(int)
    return [(int(w), int(h)) for w, h in np.maximum(sides, 1)]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth noise (bicubic-upsampled coarse noise), so tiles carry real structure."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    fine = rng.integers(-20, 21, size=(height, width, 3))
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=int)
    return Image.fromarray(np.clip(base + fine, 0, 255).astype(np.uint8))


def got_ocr2(tile: int, min_tiles: int, max_tiles: int) -> GotOcr2ImageProcessorPil:
    # The PIL backend (the default GotOcr2ImageProcessor needs torchvision, not installed here).
    return GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles, size={"height": tile, "width": tile},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )  # fmt: skip


def test_grids_are_all_arrangements_sorted_by_tile_count():
    grids = target_grids(1, 12)
    assert len(grids) == len(set(grids)) == 35
    assert grids[:5] == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1)]
    counts = [c * r for c, r in grids]
    assert counts == sorted(counts) and min(counts) == 1 and max(counts) == 12
    assert {(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= 12} == set(grids)
    assert all(3 <= c * r <= 5 for c, r in target_grids(3, 5))
    with pytest.raises(ValueError, match="min_tiles=3, max_tiles=2"):
        target_grids(3, 2)


@pytest.mark.parametrize("min_tiles,max_tiles,tile", CONFIGS)
def test_grid_and_tile_count_equal_got_ocr2(min_tiles, max_tiles, tile):
    processor = got_ocr2(tile, min_tiles, max_tiles)
    grids = target_grids(min_tiles, max_tiles)
    sizes = EXTREME_SIZES + random_sizes(300, seed=max_tiles * 1000 + min_tiles * 10 + tile)
    for w, h in sizes:
        expected_grid = get_optimal_tiled_canvas((h, w), (tile, tile), min_tiles, max_tiles)
        assert closest_grid(w, h, grids, tile) == expected_grid, (w, h)
        expected_count = processor.get_number_of_image_patches(h, w, {"min_patches": min_tiles})
        assert num_tiles(w, h, tile, min_tiles, max_tiles) == expected_count, (w, h)


@pytest.mark.parametrize(
    "sizes,tile,seed,tolerance",
    [
        (EXTREME_SIZES[:10] + random_sizes(200, seed=7, max_side=700), 28, 7, 1e-5),
        ([(800, 600), (1, 2000), (3000, 20), (1, 1), (300, 200), (600, 1100)], 448, 8, 1e-5),
    ],
    ids=["200-random-sizes-tile28", "extremes-tile448"],
)
def test_tiles_equal_got_ocr2_pixels(sizes, tile, seed, tolerance):
    """Both resize with PIL's bicubic, so after ImageNet normalisation they agree to float rounding
    (max |Δ| ≤ 1e-5 in normalised units, i.e. well below one 8-bit grey level ≈ 0.017)."""
    processor = got_ocr2(tile, 1, 12)
    for i, (w, h) in enumerate(sizes):
        image = noise_image(w, h, seed * 10_000 + i)
        ours = torch.stack([to_tensor(t) for t in dynamic_tiles(image, tile, 1, 12)])
        ref = processor(images=[image], input_data_format="channels_last", return_tensors="np")
        assert ref["num_patches"] == [len(ours)], (w, h)
        assert ours.shape == (len(ours), 3, tile, tile)
        diff = (ours - torch.from_numpy(np.asarray(ref["pixel_values"]))).abs()
        assert diff.max().item() <= tolerance, (w, h, diff.max().item())


def test_tiles_are_row_major_crops_of_the_resized_image_then_the_thumbnail():
    image = noise_image(300, 100, seed=1)  # aspect 3 → grid (3 cols, 1 row); too small for the tied (6, 2)
    tiles = dynamic_tiles(image, tile_size=128, max_tiles=12)
    assert len(tiles) == 4 and all(t.size == (128, 128) for t in tiles)
    resized = np.asarray(image.resize((384, 128), Image.Resampling.BICUBIC))
    for c in range(3):
        assert np.array_equal(np.asarray(tiles[c]), resized[:, 128 * c : 128 * (c + 1)])
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((128, 128), Image.Resampling.BICUBIC)))
    two_rows = dynamic_tiles(noise_image(64, 128, seed=2), tile_size=32, max_tiles=2)  # (1 col, 2 rows)
    resized = np.asarray(noise_image(64, 128, seed=2).resize((32, 64), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(two_rows[1]), resized[32:])


def test_thumbnail_only_when_more_than_one_tile():
    square = noise_image(100, 100, seed=3)
    assert len(dynamic_tiles(square, tile_size=448)) == 1  # small square: one tile, no thumbnail
    wide = noise_image(2000, 1000, seed=4)
    assert len(dynamic_tiles(wide, tile_size=448)) == 8 + 1  # (4, 2) grid + thumbnail
    assert len(dynamic_tiles(wide, tile_size=448, use_thumbnail=False)) == 8
    assert len(dynamic_tiles(wide, tile_size=448, max_tiles=1)) == 1
    assert num_tiles(2000, 1000, 448) == 9 and num_tiles(2000, 1000, 448, use_thumbnail=False) == 8
    assert num_tiles(1000, 500, 448) == 3  # ties with (4, 2) but too small for it: (2, 1) + thumbnail


def test_tie_goes_to_the_larger_grid_only_when_the_image_is_big_enough():
    # Aspect 1.5 with at most 2 tiles: (1,1) and (2,1) are both 0.5 away. The later grid (2,1) wins
    # iff area > 0.5 · 448² · 2 = 200704.
    grids = target_grids(1, 2)
    assert closest_grid(600, 400, grids, 448) == (2, 1)  # area 240000
    assert closest_grid(540, 360, grids, 448) == (1, 1)  # area 194400
    # Squares tie between (1,1), (2,2), (3,3): thresholds 0.5·448²·4 = 401408 and ·9 = 903168.
    grids = target_grids(1, 12)
    assert closest_grid(633, 633, grids, 448) == (1, 1)  # 400689
    assert closest_grid(634, 634, grids, 448) == (2, 2)  # 401956
    assert closest_grid(950, 950, grids, 448) == (2, 2)  # 902500
    assert closest_grid(951, 951, grids, 448) == (3, 3)  # 904401
    # A strictly closer ratio beats any tie: 3:2 is exactly (3, 2).
    assert closest_grid(300, 200, grids, 448) == (3, 2)
    assert closest_grid(10, 10, [], 448) == (1, 1)


def test_grid_order_within_a_tile_count_never_matters_when_min_tiles_is_one():
    """InternVL sorts a Python set; we sort cols-major like transformers. The order only matters if two
    grids with the same tile count tie as closest — impossible for min_tiles = 1: at the midpoint of
    their ratios some other allowed grid is strictly closer (checked exactly with fractions)."""
    for max_tiles in range(1, 13):
        grids = target_grids(1, max_tiles)
        ratio = {g: Fraction(*g) for g in grids}
        for i, p in enumerate(grids):
            for q in grids[i + 1 :]:
                if p[0] * p[1] != q[0] * q[1]:
                    continue
                mid = (ratio[p] + ratio[q]) / 2
                assert any(abs(mid - ratio[g]) < abs(mid - ratio[p]) for g in grids), (max_tiles, p, q)


def test_images_of_a_sample_share_the_tile_budget():
    images = [noise_image(1200, 500, seed=s) for s in range(3)]  # aspect 2.4
    assert tile_sample(images[:1], tile_size=448, max_tiles=12)[1] == [5 * 2 + 1]  # alone: grid (5, 2)
    pixel_values, per_image = tile_sample(images, tile_size=448, max_tiles=12)
    assert per_image == [2 * 1 + 1] * 3  # 12 // 3 = 4 tiles each: grid (2, 1) + thumbnail
    assert pixel_values.shape == (sum(per_image), 3, 448, 448) and pixel_values.dtype == torch.float32
    assert per_image == sample_tile_counts([im.size for im in images], 448, 12)
    # More images than the budget: one tile each (InternVL's max(1, max_dynamic_patch // num_image)).
    many = [noise_image(900, 300, seed=s) for s in range(13)]
    assert tile_sample(many, tile_size=32, max_tiles=12)[1] == [1] * 13
    # min_tiles above the share: a single tile, as InternVL's empty grid list gives (1, 1).
    assert sample_tile_counts([(2000, 1000)] * 3, 448, 12, min_tiles=6) == [1, 1, 1]


def test_video_frames_get_one_tile_each():
    frames = [noise_image(1280, 720, seed=s) for s in range(5)]
    pixel_values, per_frame = tile_sample(frames, tile_size=64, max_tiles=12, is_video=True)
    assert per_frame == [1] * 5 and pixel_values.shape == (5, 3, 64, 64)
    expected = to_tensor(frames[2].resize((64, 64), Image.Resampling.BICUBIC))
    assert torch.equal(pixel_values[2], expected)
    empty, none = tile_sample([], tile_size=64)
    assert empty.shape == (0, 3, 64, 64) and none == []


def test_tiling_converts_to_rgb_and_normalises_with_imagenet_statistics():
    grey = Image.new("L", (50, 50), color=255)
    pixel_values, per_image = tile_sample([grey], tile_size=64)
    assert per_image == [1] and pixel_values.shape == (1, 3, 64, 64)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pixel_values[0, :, 0, 0], expected)


def test_jpeg_reencode_is_seeded_and_off_by_default():
    image = noise_image(200, 120, seed=5)
    plain, _ = tile_sample([image], tile_size=64)
    assert torch.equal(plain, tile_sample([image], tile_size=64)[0])  # no augmentation by default
    a, _ = tile_sample([image], tile_size=64, jpeg_quality=INTERNVL_JPEG_QUALITY, rng=random.Random(0))
    b, _ = tile_sample([image], tile_size=64, jpeg_quality=INTERNVL_JPEG_QUALITY, rng=random.Random(0))
    c, _ = tile_sample([image], tile_size=64, jpeg_quality=(5, 5), rng=np.random.default_rng(0))
    assert torch.equal(a, b) and a.shape == plain.shape
    assert not torch.equal(a, plain)
    assert (c - plain).abs().mean() > (a - plain).abs().mean()  # quality 5 degrades more than 75–100
    x = jpeg_reencode(image, np.random.default_rng(3))
    y = jpeg_reencode(image, np.random.default_rng(3))
    assert x.size == image.size and x.mode == "RGB" and np.array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="rng is None"):
        tile_sample([image], jpeg_quality=(75, 100))
    with pytest.raises(ValueError, match=r"\(90, 80\)"):
        jpeg_reencode(image, random.Random(0), quality=(90, 80))
