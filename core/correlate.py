"""Rotational correlation of polar Fourier transforms, all in-plane angles at once.

For a reference Y and a particle X (CTF-multiplied) on the same polar grid, the
correlation at in-plane angle psi_m = 2 pi m / n_rot is

    lambda_m = sum_k sum_n Re[ Y(k, n + m) conj X(k, n) ] / Nrm,   n over the full ring,
    Nrm      = sqrt( sum_k P_Y(k) c2(k) * sum_k P_X(k) ),

P_Y, P_X the ring powers (full ring), c2 the particle's ring-mean CTF^2 (1 without
CTF). With Y at psi = 0 and X(k, phi) = Y(k, phi + psi) for the true psi, lambda
peaks at m = psi / psi_step (RELION's psi).

By the circular convolution theorem, with ring spectra Yh_k(q), Xh_k(q) (DFT along
the full ring), C(q) = sum_k Yh_k(q) conj Xh_k(q) and lambda = IDFT(C). Friedel
symmetry makes lambda real, so C is Hermitian: only q = 0 .. n_rot/2 is formed (one
complex matrix multiply over k per q, batched over references x particles) and one
real inverse FFT of length n_rot gives every angle: half the matrix work and half
the transform work of the plain complex path (:func:`transform_work`).
"""

import numpy as np
import scipy.fft

from prime_plugin.core.paired_kernels import paired_cross_spectra
from prime_plugin.core.pipelines import map_tiles


def ring_spectra(sections):
    """DFT along the full ring, frequencies q = 0 .. n_rot/2: complex64 (B, K, n_rot/2 + 1).

    sections : (B, K, n_rot/2) half rings; the other half is conj by Friedel symmetry.
    """
    full = np.concatenate([sections, np.conj(sections)], axis=-1)
    n_half = sections.shape[-1]
    return scipy.fft.fft(full, axis=-1, workers=-1)[..., :n_half + 1].astype(np.complex64)


def ring_powers(sections):
    """Power of each full ring, sum_phi |X|^2, float32 (B, K)."""
    return (2.0 * (np.abs(sections.astype(np.complex128)) ** 2).sum(axis=-1)).astype(np.float32)


def normalisers(reference_powers, particle_powers, particle_ctf2=None):
    """Nrm for every (reference, particle) pair, float32 (R, P).

    reference_powers (R, K), particle_powers (P, K), particle_ctf2 (P, K) ring means or None.
    """
    ref = np.asarray(reference_powers, np.float64)
    if particle_ctf2 is None:
        weighted = np.repeat(ref.sum(axis=1, keepdims=True), len(particle_powers), axis=1)
    else:
        weighted = ref @ np.asarray(particle_ctf2, np.float64).T
    total = np.asarray(particle_powers, np.float64).sum(axis=1)
    return np.sqrt(np.maximum(weighted * total[None, :], 1e-30)).astype(np.float32)


def rotational_correlations(reference_spectra, particle_spectra, norms, n_rot):
    """lambda for every reference x particle x in-plane angle, float32 (R, P, n_rot).

    reference_spectra (R, K, Q), particle_spectra (P, K, Q) from :func:`ring_spectra`
    (Q = n_rot/2 + 1); norms (R, P) from :func:`normalisers`.
    """
    ref = np.ascontiguousarray(np.moveaxis(reference_spectra, -1, 0))                # (Q, R, K)
    ptcl = np.ascontiguousarray(np.moveaxis(np.conj(particle_spectra), -1, 0))       # (Q, P, K)
    cross = np.matmul(ref, np.swapaxes(ptcl, 1, 2))                                  # (Q, R, P)
    lam = scipy.fft.irfft(cross, n=n_rot, axis=0, workers=-1)                        # (n_rot, R, P)
    return np.moveaxis(lam / norms[None], 0, -1).astype(np.float32, copy=False)


def rotational_correlations_complex(reference_sections, particle_sections, norms):
    """The plain complex path (no Friedel saving): full rings, complex FFTs; for tests and counts."""
    def full_spectra(s):
        return scipy.fft.fft(np.concatenate([s, np.conj(s)], axis=-1), axis=-1, workers=-1)
    ref = np.moveaxis(full_spectra(reference_sections), -1, 0)
    ptcl = np.moveaxis(np.conj(full_spectra(particle_sections)), -1, 0)
    cross = np.matmul(ref, np.swapaxes(ptcl, 1, 2))
    lam = scipy.fft.ifft(cross, axis=0, workers=-1).real
    return np.moveaxis(lam / norms[None], 0, -1).astype(np.float32)


def reference_operand(reference_spectra):
    """References as the left operand of the per-frequency products: complex64 (Q, R, K)."""
    return np.ascontiguousarray(np.moveaxis(reference_spectra, -1, 0))


def particle_operand(particle_spectra):
    """Particles as the right operand, conjugated: complex64 (Q, K, P); made once per search."""
    return np.ascontiguousarray(np.conj(np.moveaxis(particle_spectra, -1, 0)).transpose(0, 2, 1))


def best_rotations_prepared(reference_op, particle_op, norms, n_rot, particle_block=64):
    """Best in-plane index and correlation of every pair from prepared operands: (int64 (R, P), float32 (R, P)).

    reference_op (Q, R, K) and particle_op (Q, K, P) from :func:`reference_operand` and
    :func:`particle_operand`; norms (R, P). Per tile of particles: one complex matrix
    product per frequency q, a transpose so that each pair's spectrum is contiguous, one
    real inverse FFT of length n_rot per pair, and the arg-max along it (cache-sized tiles;
    the norm is positive, so it is applied after the maximum). Tiles run on one pipeline
    per thread, each with single-threaded BLAS and FFTs: on small products that is faster
    than one pipeline with multithreaded libraries (benchmarks/RESULTS.md).
    """
    n_refs, n_particles = reference_op.shape[1], particle_op.shape[2]
    index = np.empty((n_refs, n_particles), np.int64)
    best = np.empty((n_refs, n_particles), np.float32)

    def tile(start):
        stop = min(start + particle_block, n_particles)
        cross = np.matmul(reference_op, particle_op[:, :, start:stop])                 # (Q, R, p)
        per_pair = np.ascontiguousarray(cross.reshape(cross.shape[0], -1).T)           # (R * p, Q)
        lam = scipy.fft.irfft(per_pair, n=n_rot, axis=-1, workers=1)                   # (R * p, n_rot)
        where = lam.argmax(axis=-1)
        index[:, start:stop] = where.reshape(n_refs, -1)
        best[:, start:stop] = lam[np.arange(len(where)), where].reshape(n_refs, -1)

    map_tiles(tile, range(0, n_particles, particle_block))
    best /= norms
    return index, best


def best_rotations(reference_spectra, particle_spectra, norms, n_rot):
    """Best in-plane index and correlation of every reference x particle pair: (int64 (R, P), float32 (R, P)).

    The same numbers as :func:`rotational_correlations` followed by :func:`best_in_plane`,
    without materialising the normalised (R, P, n_rot) array.
    """
    return best_rotations_prepared(reference_operand(reference_spectra), particle_operand(particle_spectra),
                                   norms, n_rot)


def best_in_plane(correlations):
    """Best angle index and value for each pair: (int64 (R, P), float32 (R, P))."""
    index = correlations.argmax(axis=-1)
    return index, np.take_along_axis(correlations, index[..., None], axis=-1)[..., 0]


def paired_curves(reference_spectra, reference_powers, particle_spectra, particle_powers, particle_ctf2, n_rot):
    """lambda over every in-plane angle for given (particle, reference) pairs, float64 (P, C, n_rot).

    reference_spectra (P, C, K, Q) and reference_powers (P, C, K): C candidate references per
    particle; particle_spectra (P, K, Q), particle_powers and particle_ctf2 (P, K).
    """
    reference_spectra = np.ascontiguousarray(reference_spectra, np.complex64)
    cross = np.empty(reference_spectra.shape[:2] + reference_spectra.shape[3:], np.complex64)     # (P, C, Q)
    paired_cross_spectra(reference_spectra, np.ascontiguousarray(particle_spectra, np.complex64), cross)
    lam = scipy.fft.irfft(cross, n=n_rot, axis=-1)
    norms = np.sqrt(np.maximum((reference_powers * particle_ctf2[:, None]).sum(-1)
                               * particle_powers.sum(-1)[:, None], 1e-30))
    return lam / norms[..., None]


def transform_work(n_rot, n_rings):
    """Per-pair real flops of both paths: matrix work over rings and the inverse transform.

    Counts: a complex multiply-add is 8 real flops; a complex FFT of length n costs
    5 n log2 n, a real one half of it.
    """
    log_n = np.log2(n_rot)
    plain = {"matrix": 8.0 * n_rings * n_rot, "inverse_fft": 5.0 * n_rot * log_n}
    friedel = {"matrix": 8.0 * n_rings * (n_rot // 2 + 1), "inverse_fft": 2.5 * n_rot * log_n}
    return {"plain": plain, "friedel": friedel,
            "saving_matrix": 1.0 - friedel["matrix"] / plain["matrix"],
            "saving_transform": 1.0 - friedel["inverse_fft"] / plain["inverse_fft"]}
