"""The fast reconstruction kernels against plain references: slab insertion, fused image transforms, Wiener map.

Oracles: the straightforward one-point-at-a-time insertion kernel
(tests/reference_insertion.py, accumulating in double precision), numpy
compositions of the documented steps (rfft2 of the centred image, shift phases,
RELION's CTF from ctf_image), and the Wiener formula written with full-grid numpy
arrays.
"""

import numba
import numpy as np
import pytest
import scipy.fft
from scipy.spatial.transform import Rotation

import prime_plugin.core.reconstruct as reconstruct
from prime_plugin.core.ctf import CtfParams, ctf_image
from prime_plugin.core.gridding import GriddingKernel, correction_3d
from prime_plugin.core.insertion_kernels import balance_slabs
from prime_plugin.core.projector import shift_phases
from prime_plugin.core.reconstruct import Backprojector, FourierSums, reconstruct_volume, shell_radii
from prime_plugin.core.symmetry import symmetry_operators
from reference_insertion import reference_insert


def awkward_rotations(k, seed):
    """Random rotations plus ones that put whole image columns on the x = 0 plane and at the grid edges."""
    special = [np.eye(3),
               Rotation.from_euler("y", 90, degrees=True).as_matrix(),   # image x axis along z: px = 0
               Rotation.from_euler("z", 90, degrees=True).as_matrix(),   # image x axis along y
               Rotation.from_euler("zyz", [30, 90, 0], degrees=True).as_matrix()]
    return np.concatenate([special, Rotation.random(k, random_state=seed).as_matrix()])


def random_inputs(box, k, seed, max_radius_px=None):
    rng = np.random.default_rng(seed)
    m = len(Backprojector(box, max_radius_px=max_radius_px).kx)
    n = 5
    data = (rng.normal(size=(n, m)) + 1j * rng.normal(size=(n, m))).astype(np.complex64)
    ctf2 = rng.uniform(0, 1, (n, m)).astype(np.float32)
    rotations = awkward_rotations(k, seed)
    image_of = rng.integers(0, n, len(rotations))
    weights = rng.uniform(0.1, 1.0, len(rotations)).astype(np.float32)
    return data, ctf2, rotations, image_of, weights


def assert_same_sums(sums, U, rho):
    """Equal to float32 accumulation precision (relative to the largest value)."""
    assert np.abs(sums.U - U).max() <= 2e-6 * np.abs(U).max()
    assert np.abs(sums.rho - rho).max() <= 2e-6 * rho.max()


@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("kernel", [GriddingKernel(), GriddingKernel(width=4), GriddingKernel("linear")],
                         ids=["kb3", "kb4", "linear"])
def test_slab_insertion_equals_the_reference_kernel(box, kernel):
    data, ctf2, rotations, image_of, weights = random_inputs(box, 12, seed=box)
    sums = FourierSums.zeros(box)
    Backprojector(box, kernel=kernel).insert(sums, data, ctf2, rotations, image_of, weights)
    U, rho = reference_insert(box, 2.0, kernel, data, ctf2, rotations, image_of, weights)
    assert_same_sums(sums, U, rho)


@pytest.mark.parametrize("slab_planes, rows_per_block, points_per_batch",
                         [(1, 1, 100), (3, 5, 1000), (64, 64, 1 << 22)])
@pytest.mark.parametrize("threads", [1, 2])
def test_slab_insertion_does_not_depend_on_slabs_blocks_batches_or_threads(monkeypatch, slab_planes, rows_per_block,
                                                                           points_per_batch, threads):
    """Thin slabs (every point crosses slabs), thick ones, small batches (many orientation batches)."""
    monkeypatch.setattr(reconstruct, "SLAB_PLANES", slab_planes)
    monkeypatch.setattr(reconstruct, "SLABS_PER_THREAD", 1)
    monkeypatch.setattr(reconstruct, "ROWS_PER_BLOCK", rows_per_block)
    monkeypatch.setattr(reconstruct, "POINTS_PER_BATCH", points_per_batch)
    box = 18
    data, ctf2, rotations, image_of, weights = random_inputs(box, 10, seed=3, max_radius_px=7.5)
    sums = FourierSums.zeros(box)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        Backprojector(box, max_radius_px=7.5).insert(sums, data, ctf2, rotations, image_of, weights)
    finally:
        numba.set_num_threads(before)
    U, rho = reference_insert(box, 2.0, GriddingKernel(), data, ctf2, rotations, image_of, weights, 7.5)
    assert_same_sums(sums, U, rho)


def test_slabs_are_shared_evenly_and_each_once():
    points = np.array([50, 10, 40, 30, 0, 20, 25])
    slabs, start = balance_slabs(points, 3)
    assert sorted(slabs) == list(range(len(points)))
    loads = [points[slabs[start[t]:start[t + 1]]].sum() for t in range(3)]
    assert max(loads) - min(loads) <= points.max()
    assert sorted(loads) == [55, 60, 60]


def test_slab_insertion_with_symmetry_equals_the_reference_with_every_mate():
    box = 16
    data, ctf2, rotations, image_of, weights = random_inputs(box, 6, seed=9)
    ops = symmetry_operators("D3")
    sums = FourierSums.zeros(box)
    Backprojector(box, symmetry_ops=ops).insert(sums, data, ctf2, rotations, image_of, weights)
    mates = np.einsum("kij,sjl->ksil", rotations, ops).reshape(-1, 3, 3)
    U, rho = reference_insert(box, 2.0, GriddingKernel(), data, ctf2, mates, np.repeat(image_of, len(ops)),
                              np.repeat(weights, len(ops)))
    assert_same_sums(sums, U, rho)


def test_insertion_refuses_wrong_grids():
    bp = Backprojector(8)
    data = np.zeros((1, len(bp.kx)), np.complex64)
    with pytest.raises(ValueError, match="C-contiguous complex64"):
        bp.insert_into(np.zeros((16, 16, 9), np.complex128), np.zeros((16, 16, 9), np.float32), data,
                       data.real, np.eye(3))
    with pytest.raises(ValueError, match="image indices"):
        bp.insert(FourierSums.zeros(8), data, data.real, np.eye(3), image_of=[1])


def numpy_image_transforms(bp, images, shifts, ctf_grid):
    """The documented steps with numpy: FFT of the image centred at pixel 0, pick, shift, CTF."""
    spectra = np.fft.rfft2(np.fft.ifftshift(images.astype(np.float64), axes=(-2, -1))).reshape(len(images), -1)
    values = spectra[:, bp.flat] * shift_phases(bp.kx, bp.ky, shifts, bp.box)
    ctf = np.ones(values.shape) if ctf_grid is None else ctf_grid.reshape(len(images), -1)[:, bp.flat]
    return values * ctf, ctf * ctf


@pytest.mark.parametrize("box", [24, 25])
@pytest.mark.parametrize("ctf_form", ["params", "grid", "none"])
def test_fused_image_transforms_equal_the_numpy_steps(box, ctf_form):
    rng = np.random.default_rng(box)
    n, apix = 7, 1.7
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    shifts = rng.uniform(-5, 5, (n, 2))
    defocus = rng.uniform(8000, 30000, n)
    params = CtfParams(defocus, defocus * 0.9, rng.uniform(0, 180, n), np.full(n, 300.0), np.full(n, 2.7),
                       np.full(n, 0.07), phase_shift_deg=rng.uniform(0, 90, n), bfactor_A2=rng.uniform(0, 50, n),
                       scale=rng.uniform(0.5, 1.0, n))
    grid = ctf_image(params, box, apix, rfft=True)
    bp = Backprojector(box)
    given = {"params": params, "grid": grid, "none": None}[ctf_form]
    data, ctf2 = bp.image_transforms(images, shifts, given, pixel_size_A=apix)
    expected, expected2 = numpy_image_transforms(bp, images, shifts, None if ctf_form == "none" else grid)
    scale = np.abs(expected).max()
    assert np.abs(data - expected).max() <= 2e-6 * scale
    np.testing.assert_allclose(ctf2, expected2, atol=2e-6)


def numpy_reconstruct_volume(sums, fsc, kernel, max_radius_px):
    """V = U / (rho + mean shell rho (1 - FSC) / FSC) with full-grid numpy arrays (the plain formula)."""
    radii = shell_radii(sums.U.shape[0], sums.box)
    shell = np.rint(radii).astype(np.int64)
    counts = np.bincount(shell.ravel())
    mean_rho = np.bincount(shell.ravel(), weights=sums.rho.ravel()) / np.maximum(counts, 1)
    f = np.clip(np.concatenate([fsc, np.full(len(counts), 1e-3)])[:len(counts)], 1e-3, 0.999)
    denominator = sums.rho + (mean_rho * (1 - f) / f).astype(np.float32)[shell]
    V = np.where(denominator > 0, sums.U / np.where(denominator > 0, denominator, 1), 0)
    V[radii >= max_radius_px] = 0
    M = sums.U.shape[0]
    padded = np.fft.fftshift(np.fft.irfftn(V, s=(M, M, M), axes=(0, 1, 2)))
    start = M // 2 - sums.box // 2
    crop = padded[start:start + sums.box, start:start + sums.box, start:start + sums.box]
    return crop / correction_3d(kernel, sums.box, sums.padding, normalise=True)


@pytest.mark.parametrize("box", [20, 21])
def test_reconstruct_volume_equals_the_plain_formula(box):
    rng = np.random.default_rng(box)
    rotations = Rotation.random(40, random_state=box).as_matrix()
    images = rng.normal(size=(40, box, box)).astype(np.float32)
    sums = FourierSums.zeros(box)
    Backprojector(box).insert_images(sums, images, rotations)
    fsc = np.linspace(1.0, 0.0, box // 2 + 1)
    expected = numpy_reconstruct_volume(sums, fsc, GriddingKernel(), 0.4 * box)
    kept = FourierSums(sums.U.copy(), sums.rho.copy(), box)
    ours = reconstruct_volume(sums, fsc, max_radius_px=0.4 * box)
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_array_equal(sums.U, kept.U)  # not overwritten by default
    spent = reconstruct_volume(sums, fsc, max_radius_px=0.4 * box, overwrite=True)
    np.testing.assert_array_equal(spent, ours)
    assert sums.U is None and sums.rho is None


def test_fft_workers_follow_the_thread_setting():
    from prime_plugin.core.fourier import fft_workers
    from prime_plugin.core.pipelines import thread_limit

    with thread_limit(1):
        assert fft_workers() == 1 == numba.get_num_threads()
        assert scipy.fft.get_workers() == 1
