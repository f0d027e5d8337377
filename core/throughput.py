"""Throughput of the rotational-correlation search against the machine's own bound.

``pairs_per_second`` counts particle x reference pairs scored at every in-plane
angle (best angle and value kept), through the production path
(:func:`search._block_scores`: normalisers, matrix products over rings per angular
frequency, one real inverse FFT per pair, arg-max). The bound is
1 / (t_mm + t_fft) pairs per second with t_mm the time of 4 * rings * n_rot flops
at the rate of one large square complex64 matrix multiply (numpy, all cores) and
t_fft the time per transform of a large batch of length-n_rot real inverse FFTs
(scipy.fft, all cores), both measured in the same run (ARCHITECTURE.md).
"""

import time

import numpy as np
import scipy.fft

from prime_plugin.core.correlate import particle_operand, transform_work
from prime_plugin.core.pipelines import map_tiles
from prime_plugin.core.search import PolarReferences, _block_scores


def median_seconds(function, repeats):
    """Median wall time (s) of ``repeats`` calls of ``function()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops_per_second(size=2048, repeats=5):
    """Real flops per second of a size x size complex64 matrix multiply (8 n^3 flops)."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))).astype(np.complex64)
    b = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))).astype(np.complex64)
    a @ b  # warm up (thread pool, caches)
    return 8.0 * size ** 3 / median_seconds(lambda: a @ b, repeats)


def inverse_fft_seconds(n_rot, batch=65536, repeats=5):
    """Seconds per length-n_rot real inverse FFT in a large batch (scipy.fft, all cores)."""
    rng = np.random.default_rng(1)
    spectra = (rng.standard_normal((batch, n_rot // 2 + 1))
               + 1j * rng.standard_normal((batch, n_rot // 2 + 1))).astype(np.complex64)
    scipy.fft.irfft(spectra, n=n_rot, axis=-1, workers=-1)
    return median_seconds(lambda: scipy.fft.irfft(spectra, n=n_rot, axis=-1, workers=-1), repeats) / batch


def search_pairs_per_second(rings, n_rot, n_references, n_particles, block=32, repeats=5):
    """Pairs per second of the production scoring path on random polar spectra."""
    rng = np.random.default_rng(2)
    q = n_rot // 2 + 1

    def spectra(n):
        return (rng.standard_normal((n, rings, q)) + 1j * rng.standard_normal((n, rings, q))).astype(np.complex64)

    references = PolarReferences(np.zeros((n_references, 2)), None, spectra(n_references),
                                 rng.uniform(1, 2, (n_references, rings)).astype(np.float32))
    particle_spectra = spectra(n_particles)
    powers = rng.uniform(1, 2, (n_particles, rings)).astype(np.float32)
    ctf2 = rng.uniform(0.2, 1, (n_particles, rings)).astype(np.float32)

    def score_all():  # as exhaustive_search does: the particles' operand once, reference blocks in parallel
        operand = particle_operand(particle_spectra)
        blocks = [np.arange(start, min(start + block, n_references)) for start in range(0, n_references, block)]
        map_tiles(lambda rows: _block_scores(references, rows, operand, powers, ctf2, n_rot), blocks)

    score_all()
    return n_references * n_particles / median_seconds(score_all, repeats)


def search_benchmark(box=128, rings=48, n_rot=256, n_references=1024, n_particles=512, repeats=5):
    """The figures of ``prime benchmark search`` as a dict (medians of ``repeats`` runs)."""
    if rings >= box // 2:
        raise ValueError(f"{rings} rings do not fit in a box of {box} (at most {box // 2 - 1})")
    rate = matmul_flops_per_second(repeats=repeats)
    t_mm = 4.0 * rings * n_rot / rate
    t_fft = inverse_fft_seconds(n_rot, repeats=repeats)
    bound = 1.0 / (t_mm + t_fft)
    measured = search_pairs_per_second(rings, n_rot, n_references, n_particles, repeats=repeats)
    work = transform_work(n_rot, rings)
    return {"box": box, "rings": rings, "n_rot": n_rot, "references": n_references, "particles": n_particles,
            "pairs_per_second": round(measured), "bound_pairs_per_second": round(bound),
            "ratio": round(measured / bound, 3), "matmul_gflops": round(rate / 1e9, 1),
            "irfft_us": round(t_fft * 1e6, 3),
            "flops_per_pair_friedel": work["friedel"], "flops_per_pair_plain": work["plain"],
            "transform_saving": round(work["saving_transform"], 3), "matrix_saving": round(work["saving_matrix"], 3)}
