"""Quasi-uniform projection directions in one asymmetric unit of a point group.

A direction d (unit vector in map coordinates, see :mod:`.geometry`) has the
symmetry mates {R d : R in the group}; projections along mates are the same
images up to an in-plane rotation. One asymmetric unit is chosen by a fixed rule:
d belongs to it when, of all its mates, d itself is the one closest to the
generic reference direction ``ASU_REFERENCE`` (a point on no symmetry axis), i.e.
the asymmetric unit is the Voronoi cell of that reference among its own mates.

Directions come from a Fibonacci (golden spiral) lattice over the whole sphere,
kept where they fall inside the asymmetric unit. Near the unit's edges a kept
direction can land close to a mate of another one; the later of such a pair is
dropped so that no two returned directions are (nearly) mates (a mate of one is
at least half a step from the other). Filtering leaves holes in the unit's narrow
corners at n-fold axes; these are filled from a denser lattice until every point
of the sphere is within ~0.75 step (+ the dense lattice's spacing) of a mate.

The angular step is the square root of the solid angle per direction over the
whole sphere, ``sqrt(4 pi / (m * order))`` in degrees for m directions; this is
within ~2 % of RELION's HEALPix sampling step (60 / 2**k degrees).
"""

import numpy as np
from scipy.spatial import cKDTree

from .errors import PrimeInputError
from .geometry import direction_to_angles, projection_direction
from .symmetry import symmetry_operators

__all__ = ["asymmetric_unit_directions", "directions_for_count", "canonical_mates", "direction_neighbours",
           "coarse_subset", "ASU_REFERENCE"]

# Generic: tilt 11.3 deg, rot 23.9 deg, on no axis of any supported group.
ASU_REFERENCE = projection_direction(23.9, 11.3)
# Two kept directions are 'nearly mates' when a mate of one is this close (in steps).
_MIN_MATE_SEPARATION = 0.5
# Largest hole left between mates before a direction is added (in steps).
_GAP_FILL = 0.75
_CHUNK = 200_000  # lattice points per batch when testing membership (bounds memory)


def _lattice_size(step_rad):
    """Number of lattice points over the whole sphere for a step (radians)."""
    return max(int(round(4.0 * np.pi / step_rad ** 2)), 1)


def _fibonacci_sphere(n):
    """``n`` quasi-uniform unit vectors, shape (n, 3): golden-angle spiral, equal-area in z."""
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def canonical_mates(directions, operators):
    """Index of the mate closest to ``ASU_REFERENCE`` for each direction.

    Parameters
    ----------
    directions : ndarray, shape (n, 3)
        Unit vectors.
    operators : ndarray, shape (order, 3, 3)
        The group's rotations, identity first.

    Returns
    -------
    ndarray of int, shape (n,)
        k such that ``operators[k] @ d`` is the canonical mate; 0 means d is in the
        asymmetric unit.
    """
    # (R d) . ref = d . (R^T ref): dot each direction with the reference's mates.
    ref_mates = np.einsum("kji,j->ki", operators, ASU_REFERENCE)
    out = np.empty(len(directions), dtype=np.int64)
    for start in range(0, len(directions), _CHUNK):
        out[start:start + _CHUNK] = np.argmax(directions[start:start + _CHUNK] @ ref_mates.T, axis=1)
    return out


def _drop_near_mates(kept, operators, step_rad):
    """Remove the later of any two kept directions whose mates are closer than the limit."""
    m = len(kept)
    if m < 2:
        return kept
    mates = np.einsum("kij,nj->kni", operators, kept).reshape(-1, 3)
    owner = np.tile(np.arange(m), len(operators))
    limit = 2.0 * np.sin(0.5 * _MIN_MATE_SEPARATION * step_rad)  # chord length
    pairs = cKDTree(mates).query_pairs(limit, output_type="ndarray")
    a, b = owner[pairs[:, 0]], owner[pairs[:, 1]]
    clash = a != b
    drop = np.zeros(m, dtype=bool)
    drop[np.maximum(a[clash], b[clash])] = True
    return kept[~drop]


def _canonical(directions, operators):
    """The canonical mate of each direction (n, 3): a point of the asymmetric unit."""
    k = canonical_mates(directions, operators)
    return np.einsum("nij,nj->ni", operators[k], directions)


def _fill_gaps(kept, operators, step_rad):
    """Add directions where the mates of ``kept`` leave gaps wider than the limit.

    Filtering a lattice leaves holes in the narrow corners of the asymmetric unit
    (around n-fold axes, worst for C<n> with large n). Candidates are all points of
    a 4x denser lattice folded into the unit; while some candidate is farther than
    ``_GAP_FILL`` steps from every mate of the kept set, the one with the largest
    gap is added (gaps are only lowered near new mates, so they are upper bounds,
    but every added direction is truly farther than the limit from all mates).
    """
    candidates = _canonical(_fibonacci_sphere(4 * _lattice_size(step_rad)), operators)
    limit = 2.0 * np.sin(0.5 * _GAP_FILL * step_rad)
    mates = np.einsum("kij,nj->kni", operators, kept).reshape(-1, 3)
    gap = np.full(len(candidates), np.inf)
    if len(mates):
        gap = cKDTree(mates).query(candidates)[0]  # chord distance to the nearest mate
    candidate_tree = cKDTree(candidates)
    added = []
    while gap.max() > limit:  # one round per added direction: few, at the corners
        best = candidates[np.argmax(gap)]
        added.append(best)
        new_mates = operators @ best
        for near, mate in zip(candidate_tree.query_ball_point(new_mates, limit), new_mates):
            near = np.asarray(near, dtype=np.int64)
            gap[near] = np.minimum(gap[near], np.linalg.norm(candidates[near] - mate, axis=1))
    return np.concatenate([kept, np.reshape(added, (-1, 3))])


def asymmetric_unit_directions(name, angular_step_deg):
    """Projection directions covering one asymmetric unit of group ``name``.

    Parameters
    ----------
    name : str
        Point group (see :func:`.symmetry.symmetry_operators`).
    angular_step_deg : float
        Target angular step in degrees (sqrt of solid angle per direction), > 0.

    Returns
    -------
    angles_deg : ndarray, float64, shape (m, 2)
        (rot, tilt) in degrees of each direction; tilt in [0, 180].
    achieved_step_deg : float
        ``sqrt(4 pi / (m * order))`` in degrees: the step actually achieved.
    """
    step = float(angular_step_deg)
    if not (np.isfinite(step) and step > 0.0):
        raise PrimeInputError(f"angular step must be a positive number of degrees, got {angular_step_deg!r}")
    operators = symmetry_operators(name)
    step_rad = np.radians(step)
    lattice = _fibonacci_sphere(max(_lattice_size(step_rad), len(operators)))
    kept = lattice[canonical_mates(lattice, operators) == 0]
    kept = _fill_gaps(_drop_near_mates(kept, operators, step_rad), operators, step_rad)
    rot, tilt = direction_to_angles(kept)
    achieved = np.degrees(np.sqrt(4.0 * np.pi / (len(kept) * len(operators))))
    return np.stack([rot, tilt], axis=1), float(achieved)


def directions_for_count(name, n_space):
    """About ``n_space`` directions in one asymmetric unit of group ``name``.

    Parameters
    ----------
    name : str
        Point group.
    n_space : int
        Wanted number of directions (>= 1); the result is within a few percent.

    Returns
    -------
    angles_deg : ndarray, float64, shape (m, 2)
        (rot, tilt) in degrees.
    achieved_step_deg : float
        As in :func:`asymmetric_unit_directions`.
    """
    if int(n_space) < 1:
        raise PrimeInputError(f"number of directions must be >= 1, got {n_space!r}")
    order = len(symmetry_operators(name))
    step_deg = np.degrees(np.sqrt(4.0 * np.pi / (int(n_space) * order)))
    return asymmetric_unit_directions(name, step_deg)


def direction_neighbours(directions_deg, operators, count=8, block=1024):
    """The ``count`` nearest other directions of each direction, symmetry mates included.

    Parameters
    ----------
    directions_deg : (m, 2) (rot, tilt) in degrees, e.g. from :func:`asymmetric_unit_directions`.
    operators : (order, 3, 3) the point group's rotations.

    Returns
    -------
    ndarray, int64 (m, count): indices, nearest first (distance = smallest angle between
    a direction and any symmetry mate of the other).
    """
    unit = projection_direction(directions_deg[:, 0], directions_deg[:, 1])
    mates = np.einsum("sij,mj->smi", operators, unit)  # (order, m, 3)
    count = min(count, len(unit) - 1)
    out = np.empty((len(unit), count), np.int64)
    for start in range(0, len(unit), block):
        rows = unit[start:start + block]
        cosine = np.einsum("bi,smi->bsm", rows, mates).max(axis=1)  # (b, m)
        cosine[np.arange(len(rows)), np.arange(start, start + len(rows))] = -np.inf
        nearest = np.argpartition(-cosine, count - 1, axis=1)[:, :count]
        order = np.argsort(-np.take_along_axis(cosine, nearest, 1), axis=1, kind="stable")
        out[start:start + len(rows)] = np.take_along_axis(nearest, order, 1)
    return out


def coarse_subset(directions_deg, operators, fraction=0.25):
    """Indices of about ``fraction`` of the directions, spread as evenly as a coarser grid.

    The nearest direction (symmetry mates included) to each point of a coarser
    quasi-uniform lattice of the asymmetric unit; used to start an exhaustive search coarsely.
    """
    unit = projection_direction(directions_deg[:, 0], directions_deg[:, 1])
    mates = np.einsum("sij,mj->smi", operators, unit)
    wanted = max(1, int(round(fraction * len(unit))))
    lattice = _fibonacci_sphere(wanted * len(operators))
    coarse = lattice[canonical_mates(lattice, operators) == 0]
    nearest = np.einsum("ci,smi->csm", coarse, mates).max(axis=1).argmax(axis=1)
    return np.unique(nearest)
