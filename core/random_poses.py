"""Random particle parameters for simulations: orientations, origins, defocus.

Every function takes a seeded ``numpy.random.Generator`` and draws from it in a
fixed order, so a seed gives the same parameters on every machine.
"""

import numpy as np

__all__ = ["random_orientations", "random_origins_px", "random_defocus"]

MAX_ASTIGMATISM = 0.1  # defocus V = U * (1 - up to this fraction)


def random_orientations(n, rng, operators):
    """Uniform random rotations, each moved into the asymmetric unit of a point group.

    Parameters
    ----------
    n : int
    rng : numpy.random.Generator
    operators : ndarray (order, 3, 3)
        The group's rotations (:func:`.symmetry.symmetry_operators`), identity first.

    Returns
    -------
    ndarray, float64, (n, 3)
        RELION Euler angles (rot, tilt, psi) in degrees. Matrices A are uniform on
        SO(3) (normalised Gaussian quaternions); each is replaced by its mate
        ``A R.T`` (R in the group) whose projection direction (third row, which
        becomes R times A's) is the canonical one of
        :func:`.directions.canonical_mates`. For a map with that symmetry the
        projection is unchanged (v(R.T x) = v(x)).
    """
    from scipy.spatial.transform import Rotation

    from prime_plugin.core.directions import canonical_mates
    from prime_plugin.core.geometry import matrix_to_euler

    quaternions = rng.standard_normal((n, 4))
    quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
    matrices = Rotation.from_quat(quaternions).as_matrix()
    mate = canonical_mates(matrices[:, 2, :], operators)
    folded = matrices @ operators[mate].transpose(0, 2, 1)
    return np.stack(matrix_to_euler(folded), axis=1)


def random_origins_px(n, rng, max_shift_px):
    """RELION origins (x, y) in pixels, float64 (n, 2), uniform in a disc of radius ``max_shift_px``."""
    radius = max_shift_px * np.sqrt(rng.random(n))
    angle = 2.0 * np.pi * rng.random(n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def random_defocus(n, rng, defocus_range_um):
    """Astigmatic defocus, float64 (n, 3): U and V in Angstrom, astigmatism angle in degrees.

    U is uniform in ``defocus_range_um`` = (min, max) micrometres, V = U times
    (1 - uniform[0, MAX_ASTIGMATISM)), the angle uniform in [0, 180).
    """
    low, high = defocus_range_um
    defocus_u = rng.uniform(low, high, size=n) * 1e4
    defocus_v = defocus_u * (1.0 - MAX_ASTIGMATISM * rng.random(n))
    return np.stack([defocus_u, defocus_v, 180.0 * rng.random(n)], axis=1)
