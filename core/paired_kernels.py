"""Numba kernel of the local search's scoring: the cross spectra of particles with their own candidates.

Each particle has its own candidate references (a local window around its orientation),
so the products are paired, not a matrix product: numpy's broadcast product and sum over
rings made a (P, C, K, Q) temporary per origin offset and ran on one thread (about 8x
slower on 2 cores at K = 82, Q = 241). Public wrapper: :func:`correlate.paired_curves`.
"""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def paired_cross_spectra(reference_spectra, particle_spectra, out):
    """out[p, c, q] = sum_k reference_spectra[p, c, k, q] * conj(particle_spectra[p, k, q]).

    reference_spectra complex64 (P, C, K, Q); particle_spectra complex64 (P, K, Q); out complex64
    (P, C, Q), overwritten. Accumulates in complex64, ring by ring (as numpy's sum over an inner axis).
    """
    n_particles, n_candidates, n_rings, n_terms = reference_spectra.shape
    for pair in prange(n_particles * n_candidates):
        p = pair // n_candidates
        c = pair % n_candidates
        for q in range(n_terms):
            out[p, c, q] = 0
        for k in range(n_rings):
            for q in range(n_terms):
                out[p, c, q] += reference_spectra[p, c, k, q] * np.conj(particle_spectra[p, k, q])
