"""Solvent masks (core.masking, ``prime mask``): exact distances on a box, relion_mask_create as the oracle.

Data, all made here:
- a solid cube of voxels (a digital box, whose Euclidean distance to any voxel has a
  closed form) in a 24^3 map, value 1 inside, 0 outside;
- RELION: the 64^3 beta-galactosidase map shipped in prime_plugin/data (scaled to unit
  sd), masked by relion_mask_create and by ``prime mask`` with the same parameters.
"""

import mrcfile
import numpy as np
import pytest

from prime_plugin.cli import main as prime_main
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.masking import solvent_mask

BOX, LOW, HIGH = 24, 9, 14  # the cube holds voxels LOW..HIGH on each axis


def cube_map():
    volume = np.zeros((BOX, BOX, BOX), np.float32)
    volume[LOW:HIGH + 1, LOW:HIGH + 1, LOW:HIGH + 1] = 1.0
    return volume


def distance_to_cube():
    """Euclidean distance (voxels) of every voxel to the nearest voxel of the cube: per axis, how far outside."""
    c = np.arange(BOX)
    gap = np.maximum(np.maximum(LOW - c, c - HIGH), 0).astype(np.float64)
    return np.sqrt(gap[:, None, None] ** 2 + gap[None, :, None] ** 2 + gap[None, None, :] ** 2)


def brute_force_distance(region):
    """Distance of every voxel to the nearest voxel of ``region``, by comparing every pair (RELION's scan)."""
    grid = np.stack(np.meshgrid(*[np.arange(BOX)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    members = grid[region.reshape(-1)]
    best = np.full(len(grid), np.inf)
    for start in range(0, len(members), 256):
        part = members[start:start + 256]
        best = np.minimum(best, ((grid[:, None, :] - part[None, :, :]) ** 2).sum(-1).min(axis=1))
    return np.sqrt(best).reshape(region.shape)


def test_threshold_alone_gives_the_binary_mask():
    mask = solvent_mask(cube_map(), 2.0, threshold=0.5)
    assert mask.dtype == np.float32
    assert np.array_equal(mask, cube_map())
    assert np.array_equal(solvent_mask(cube_map(), 2.0, threshold=1.0), cube_map())  # ">=", as RELION


@pytest.mark.parametrize("extend_px, soft_edge_px", [(2.0, 3.0), (1.5, 4.5), (0.0, 2.0), (3.0, 0.0)])
def test_extension_and_soft_edge_follow_the_distance_to_the_map(extend_px, soft_edge_px):
    mask = solvent_mask(cube_map(), 2.0, threshold=0.5, extend_px=extend_px, soft_edge_px=soft_edge_px)
    extended = distance_to_cube() < extend_px if extend_px > 0 else cube_map() > 0.5
    assert np.array_equal(mask == 1.0, extended)
    if soft_edge_px > 0:
        d = brute_force_distance(extended)
        expected = np.where(extended, 1.0, np.where(d < soft_edge_px, 0.5 + 0.5 * np.cos(np.pi * d / soft_edge_px), 0))
    else:
        expected = extended.astype(np.float64)
    assert np.abs(mask - expected).max() < 1e-6
    # The widths measured along an axis from the middle of a face: ones up to the extension, then the edge.
    profile = mask[(LOW + HIGH) // 2, (LOW + HIGH) // 2, HIGH + 1:]
    ones = int(np.argmin(profile == 1.0))
    edge = int(((profile > 0) & (profile < 1)).sum())
    assert ones == int(np.ceil(extend_px)) - 1 if extend_px > 0 else ones == 0
    assert edge == max(int(np.ceil(soft_edge_px)) - 1, 0)


def test_negative_extension_shrinks():
    # A voxel leaves when an outside voxel is closer than 2 (strictly, RELION's rule): only the outer layer
    # (distance 1); the next one (distance 2) stays.
    mask = solvent_mask(cube_map(), 2.0, threshold=0.5, extend_px=-2.0)
    expected = np.zeros_like(mask)
    expected[LOW + 1:HIGH, LOW + 1:HIGH, LOW + 1:HIGH] = 1.0
    assert np.array_equal(mask, expected)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(PrimeInputError, match="no voxel of the map reaches threshold 2"):
        solvent_mask(cube_map(), 2.0, threshold=2.0)
    with pytest.raises(PrimeInputError, match="soft_edge_px must be >= 0"):
        solvent_mask(cube_map(), 2.0, threshold=0.5, soft_edge_px=-1)
    with pytest.raises(PrimeInputError, match="empty mask"):
        solvent_mask(cube_map(), 2.0, threshold=0.5, extend_px=-4)
    with pytest.raises(PrimeInputError, match="pixel_size_A"):
        solvent_mask(cube_map(), 0.0, threshold=0.5, lowpass_A=10)


# ---------------------------------------------------------------- relion_mask_create

@pytest.fixture(scope="module")
def betagal(tmp_path_factory):
    from importlib.resources import files

    volume = mrcfile.read(str(files("prime_plugin") / "data" / "betagal_d2_64.mrc")).astype(np.float32)
    folder = tmp_path_factory.mktemp("mask")
    with mrcfile.new(folder / "map.mrc") as mrc:
        mrc.set_data(volume / volume.std())
        mrc.voxel_size = 3.6
    return folder


@pytest.mark.relion
@pytest.mark.parametrize("threshold, extend, soft, lowpass", [(1.0, 2, 4, None), (0.5, 3, 5, 15.0)],
                         ids=["plain", "lowpass"])
def test_same_mask_as_relion_mask_create(betagal, relion, threshold, extend, soft, lowpass):
    tag = "lowpass" if lowpass else "plain"
    options = ["--lowpass", lowpass] if lowpass else []
    relion("relion_mask_create", "--i", "map.mrc", "--o", f"relion_{tag}.mrc", "--ini_threshold", threshold,
           "--extend_inimask", extend, "--width_soft_edge", soft, *options, cwd=betagal)
    assert prime_main(["mask", "--i", str(betagal / "map.mrc"), "--o", str(betagal / f"prime_{tag}.mrc"),
                       "--threshold", str(threshold), "--extend", str(extend), "--soft_edge", str(soft),
                       *map(str, options)]) == 0
    theirs = mrcfile.read(betagal / f"relion_{tag}.mrc")
    ours = mrcfile.open(betagal / f"prime_{tag}.mrc")
    assert ours.voxel_size.x == pytest.approx(3.6)
    a, b = theirs > 0.5, ours.data > 0.5
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    print(f"Dice {dice:.4f}, largest difference {np.abs(theirs - ours.data).max():.2e}")
    assert dice >= 0.95, dice
    # Observed with RELION 3.1.3: the same mask to the last bit; a loose bound leaves room for rounding.
    assert np.abs(theirs - ours.data).max() < 1e-3
