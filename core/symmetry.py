"""Point-group symmetry operators with RELION's axis conventions.

Supported (case-insensitive): ``C<n>`` and ``D<n>`` (n >= 1), ``T``, ``O``, ``I``
and ``I1``..``I4``. Axes follow RELION 3.1 (checked against
``relion_refine --print_symmetry_ops``):

- C<n>: n-fold about z.  D<n>: n-fold about z, 2-fold about x.
- T: 3-fold about z, 2-fold about (0, sqrt(2/3), sqrt(1/3)).
- O: 4-fold about z, 3-fold about (1, 1, 1): the cube's axes.
- I1: 2-folds on x, y, z, 5-folds along (+-tau, 0, 1) (Crowther convention).
- I2 (RELION's default ``I``): 2-folds on x, y, z, 5-folds along (+-1, 0, tau).
- I3: 5-fold about z, 2-fold about y, a neighbouring 5-fold along (2, 0, -1)/sqrt 5.
- I4: as I3 with that neighbour along (2, 0, 1)/sqrt 5.

Each group is generated from two rotations and closed under products, so no
table is hard-coded. The identity is always operator 0.
"""

import re

import numpy as np

from .errors import PrimeInputError

__all__ = ["symmetry_operators", "symmetry_order", "rotation_about_axis"]

_TAU = (1.0 + np.sqrt(5.0)) / 2.0  # golden ratio
_DEDUP_TOL = 1e-6
_MAX_ORDER = 100_000  # guards the closure loop against a bad generator


def rotation_about_axis(axis, angle_deg):
    """Right-handed rotation matrix about ``axis`` (3,) by ``angle_deg`` degrees, shape (3, 3)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    a = np.radians(angle_deg)
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.cos(a) * np.eye(3) + np.sin(a) * cross + (1.0 - np.cos(a)) * np.outer(u, u)


def _generators(kind, n):
    """The two (or one) generating rotations of a group, as a list of (3, 3) arrays."""
    z = (0.0, 0.0, 1.0)
    if kind == "C":
        return [rotation_about_axis(z, 360.0 / n)]
    if kind == "D":
        return [rotation_about_axis(z, 360.0 / n), rotation_about_axis((1.0, 0.0, 0.0), 180.0)]
    if kind == "T":
        return [rotation_about_axis(z, 120.0),
                rotation_about_axis((0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)), 180.0)]
    if kind == "O":
        return [rotation_about_axis(z, 90.0), rotation_about_axis((1.0, 1.0, 1.0), 120.0)]
    # Icosahedral: a 5-fold plus a rotation not in that 5-fold's D5 subgroup.
    five_fold = {1: (_TAU, 0.0, 1.0), 2: (1.0, 0.0, _TAU), 3: (2.0, 0.0, -1.0), 4: (2.0, 0.0, 1.0)}[n]
    if n in (1, 2):
        return [rotation_about_axis(five_fold, 72.0), rotation_about_axis(z, 180.0)]
    return [rotation_about_axis(z, 72.0), rotation_about_axis(five_fold, 72.0)]


def _close_group(generators):
    """All products of ``generators`` (list of (3, 3)), deduplicated; shape (order, 3, 3).

    Breadth-first: multiply every newly found element by every generator (vectorised
    per generation) until nothing new appears. The identity comes first.
    """
    group = np.eye(3)[None]
    frontier = group
    gens = np.stack(generators)
    while len(frontier):
        candidates = np.einsum("gij,fjk->fgik", gens, frontier).reshape(-1, 3, 3)
        # Dedupe candidates against the group found so far, then among themselves.
        diff = np.abs(candidates[:, None] - group[None]).max(axis=(2, 3))
        candidates = candidates[diff.min(axis=1) > _DEDUP_TOL]
        fresh = []
        for c in candidates:  # the frontier is small (<= order * number of generators)
            if all(np.abs(c - f).max() > _DEDUP_TOL for f in fresh):
                fresh.append(c)
        frontier = np.array(fresh).reshape(-1, 3, 3)
        group = np.concatenate([group, frontier])
        if len(group) > _MAX_ORDER:
            raise RuntimeError("symmetry group closure did not converge")
    return group


def _parse(name):
    """('C' | 'D' | 'T' | 'O' | 'I', n) for a group name, or PrimeInputError."""
    match = re.fullmatch(r"([CD])([1-9][0-9]*)|([TO])|I([1-4]?)", str(name).strip().upper())
    if match is None:
        raise PrimeInputError(f"unknown symmetry group '{name}' (expected C<n>, D<n>, T, O or I)")
    if match.group(1):
        return match.group(1), int(match.group(2))
    if match.group(3):
        return match.group(3), 1
    return "I", int(match.group(4) or 2)  # RELION's plain 'I' is I2


def symmetry_operators(name):
    """Rotation matrices of point group ``name``.

    Parameters
    ----------
    name : str
        ``C<n>``, ``D<n>`` (n >= 1), ``T``, ``O``, ``I`` or ``I1``..``I4``,
        case-insensitive (``I`` is RELION's default, ``I2``).

    Returns
    -------
    ndarray, float64, shape (order, 3, 3)
        The group's rotations, identity first; the set is closed under products and
        inverses, so it is the same whether applied as ``R`` or ``R.T``.

    Raises
    ------
    PrimeInputError
        For an unknown or malformed name (e.g. ``'X3'``, ``'C0'``, ``'D'``, ``''``).
    """
    kind, n = _parse(name)
    return _close_group(_generators(kind, n))


def symmetry_order(name):
    """Number of rotations in point group ``name`` (C<n>: n, D<n>: 2n, T: 12, O: 24, I: 60)."""
    kind, n = _parse(name)
    return {"C": n, "D": 2 * n, "T": 12, "O": 24, "I": 60}[kind]
