"""Find a point group's symmetry axes in a C1 map and rotate the map into RELION's orientation.

The problem: a map ``v`` with point-group symmetry G in an unknown orientation. Wanted: the
rotation R such that the aligned map ``w(r) = v(R^T r)`` (a feature at p in v lands at R p in w)
obeys G's operators as :func:`symmetry.symmetry_operators` gives them (RELION's axes: C<n>
and D<n> about z, D's 2-fold on x, ...), which is what ``relion_align_symmetry`` outputs.

The score. ``w`` is symmetric when ``w(g r) = w(r)`` for every g in G, that is when
``v(Q g Q^T r) = v(r)`` with Q = R^T: each group element, conjugated by the candidate
orientation, is a rotation about the axis ``Q a_g`` by the element's angle, and v must agree
with itself rotated so. The score of Q is the mean, over G's elements other than the identity
(one of each pair g, g^-1: their correlations are the same), of the Pearson correlation,
inside a sphere, between v and v rotated by ``Q g Q^T`` (the map's self-rotation function at
those axes and angles). Its maximum is 1 for a perfectly symmetric map; a random map scores
about 0.

The search (after RELION's re-centring on the centre of mass, unless asked not to):

1. The map is Fourier-cropped to a small working box (``max_box``, 40 voxels by default,
   never finer than half the resolution asked for) and low-passed; rotated copies are sampled
   by trilinear interpolation in a copy upsampled twice (so the interpolation's blur is small
   next to the low-pass's).
2. The group's highest-order axis (the n-fold of C<n> and D<n>, a 3-fold of T, a 4-fold of O,
   a 5-fold of I) is looked for alone: for every direction u of a half sphere (``step_deg``
   apart; u and -u are the same axis) the score of the rotations about u by 360 k / n. The best
   ``n_candidates`` directions, at least three steps apart, are kept.
3. For each kept direction, the orientation about it: the rotation taking the standard
   highest-order axis to u, turned about u by psi in [0, 360 / n) (a turn by 360 / n gives the
   same aligned map), scored with every element of G. For C<n> nothing depends on psi (any
   turn about z is as good: RELION's output is arbitrary there too).
4. The best orientations, one per direction, are refined by Nelder-Mead over a small rotation
   (3 angles) with the whole score, and the best result is kept.

The whole map is then re-centred and rotated by R (cubic B-spline interpolation) and, as
``relion_align_symmetry --apply_sym`` does on request, averaged over G. The answer is defined
up to G (g R gives the same aligned map; the one nearest the identity is returned) and, for
groups with a larger normaliser, up to it (for C<n> any turn about z; for D2 a permutation of
x, y, z): :func:`axis_disagreement_deg` compares two answers by their axes.
"""

from dataclasses import dataclass

import numpy as np
import scipy.optimize
from scipy.spatial.transform import Rotation

from prime_plugin.core.directions import asymmetric_unit_directions
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.fourier import low_pass
from prime_plugin.core.geometry import matrix_to_euler, projection_direction
from prime_plugin.core.resample import resample_volume
from prime_plugin.core.symmetry import symmetry_operators
from prime_plugin.core.symmetry_search_kernels import rotated_correlations
from prime_plugin.core.volume_rotation import (recentring_shift, rotate_volume, shifted_volume, sphere_correlation,
                                               symmetrise_volume)

__all__ = ["SymmetryAlignment", "find_symmetry_axes", "symmetry_axes", "axis_disagreement_deg", "SelfRotation"]

_AXIS_TOL = 1e-6  # two axes (unit vectors) are one line when |u . v| exceeds 1 - this
_UPSAMPLING = 2  # the interpolated copy is this many times finer than the working grid
# The global steps run on a map this small (about 5,600 voxels in its sphere, against 29,000 at
# box 40): at a 5-degree step its correlation peaks are still several steps wide.
_COARSE_BOX = 24


@dataclass
class SymmetryAlignment:
    """The result of :func:`find_symmetry_axes`.

    rotation : float64 (3, 3)
        R, acting on (x, y, z) coordinates from the box centre: the aligned map is
        ``w(r) = v(R^T r)`` of the re-centred input v; G's axes in the input map are ``R^T a``
        for G's standard axes a.
    euler_deg : (rot, tilt, psi)
        R's RELION Euler angles in degrees (``euler_to_matrix(*euler_deg) == R``).
    score : float
        Pearson correlation, inside the box's inscribed sphere, between the whole aligned map
        and its average over G (1 for a perfectly symmetric map).
    search_score : float
        The search's score at R (mean correlation of the working map with its G-rotated
        copies, see the module docstring).
    volume : float32 (N, N, N), [z, y, x]
        The aligned map (averaged over G when asked).
    shift_px : float64 (3,)
        (x, y, z) voxels the input was moved by before rotating (centre of mass to the centre).
    working_pixel_size_A : float
        Voxel size of the working map the search ran on, in Angstrom.
    working_box : int
        Its box, in voxels.
    """

    rotation: np.ndarray
    euler_deg: tuple
    score: float
    search_score: float
    volume: np.ndarray
    shift_px: np.ndarray
    working_pixel_size_A: float
    working_box: int


# ---------------------------------------------------------------- group geometry

def _axis_angles(operators):
    """Unit axes (k, 3), with a fixed sign, and angles in degrees (k,) in (0, 180] of rotations (k, 3, 3)."""
    rotvec = Rotation.from_matrix(operators).as_rotvec()
    angles = np.degrees(np.linalg.norm(rotvec, axis=1))
    axes = rotvec / np.maximum(np.linalg.norm(rotvec, axis=1, keepdims=True), 1e-300)
    # One sign per line, so that equal lines compare equal: towards a direction on no axis.
    flip = axes @ np.array([0.3, 0.5, 0.8]) < 0
    axes[flip] *= -1.0
    return axes, angles


def symmetry_axes(symmetry):
    """The rotation axes of a point group in RELION's orientation, by order.

    Returns
    -------
    dict int -> float64 (k, 3)
        For each axis order n (2, 3, 4, 5, or C<n>'s and D<n>'s n), the unit (x, y, z) directions
        of the n-fold axes, each line once (sign arbitrary). Empty for C1.
    """
    operators = symmetry_operators(symmetry)[1:]
    if len(operators) == 0:
        return {}
    axes, angles = _axis_angles(operators)
    lines, orders = [], []
    for axis, angle in zip(axes, angles):
        order = int(round(360.0 / angle))
        for i, line in enumerate(lines):
            if abs(line @ axis) > 1.0 - _AXIS_TOL:
                orders[i] = max(orders[i], order)  # the smallest angle about a line gives its order
                break
        else:
            lines.append(axis)
            orders.append(order)
    lines, orders = np.array(lines), np.array(orders)
    return {int(n): lines[orders == n] for n in sorted(set(orders.tolist()))}


def axis_disagreement_deg(symmetry, rotation_a, rotation_b):
    """Largest angle (deg) between G's axes as placed by two alignments of the same map.

    rotation_a, rotation_b : (3, 3) rotations R of :class:`SymmetryAlignment` (G's axes sit at
    ``R^T a`` in the map). Every n-fold axis of one is matched to the nearest n-fold axis of the
    other (axes as lines, so up to sign) both ways: 0 when the two give the same axes, whatever
    the group element or normaliser element between them.
    """
    worst = 0.0
    for lines in symmetry_axes(symmetry).values():
        a = lines @ np.asarray(rotation_a, np.float64)  # rows: (R^T a)^T = a^T R
        b = lines @ np.asarray(rotation_b, np.float64)
        cosines = np.clip(np.abs(a @ b.T), 0.0, 1.0)
        nearest = np.concatenate([cosines.max(axis=1), cosines.max(axis=0)])
        worst = max(worst, float(np.degrees(np.arccos(nearest.min()))))
    return worst


def _scored_elements(operators):
    """G's elements without the identity and with one of each pair g, g^-1, float64 (e, 3, 3)."""
    kept = []
    for g in operators[1:]:
        if not any(np.abs(g.T - h).max() < 1e-9 for h in kept):
            kept.append(g)
    return np.array(kept).reshape(-1, 3, 3)


def _primary_axis(symmetry):
    """(order n, unit axis (3,)): G's highest-order axis, the one nearest z among equals."""
    by_order = symmetry_axes(symmetry)
    n = max(by_order)
    lines = by_order[n]
    axis = lines[np.argmax(np.abs(lines[:, 2]))]
    return n, axis * (np.sign(axis[2]) or 1.0)


def _rotation_taking(a, b):
    """A rotation (3, 3) taking unit vector a to unit vector b (the shortest one)."""
    cross = np.cross(a, b)
    sin, cos = np.linalg.norm(cross), float(a @ b)
    if sin < 1e-12:
        if cos > 0:
            return np.eye(3)
        perpendicular = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        return Rotation.from_rotvec(np.pi * perpendicular / np.linalg.norm(perpendicular)).as_matrix()
    return Rotation.from_rotvec(np.arctan2(sin, cos) * cross / sin).as_matrix()


# ---------------------------------------------------------------- the score

class SelfRotation:
    """A working map's correlations with rotated copies of itself.

    Parameters
    ----------
    working_map : float32 (n, n, n), [z, y, x]
        The (small, low-passed) map, centre at n // 2.
    radius_px : float
        Radius in working voxels of the sphere the correlations are taken in.
    """

    def __init__(self, working_map, radius_px):
        n = working_map.shape[0]
        c = np.arange(n) - n // 2
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        inside = x * x + y * y + z * z <= radius_px * radius_px
        self.points = np.stack([x[inside], y[inside], z[inside]], axis=1).astype(np.float64)
        values = working_map[inside].astype(np.float64)
        values -= values.mean()
        norm = np.linalg.norm(values)
        if norm == 0:
            raise PrimeInputError("the map is constant inside the search sphere: no density to align")
        self.reference = values / norm
        self.fine_map, _ = resample_volume(working_map.astype(np.float32), 1.0, 1.0 / _UPSAMPLING)
        self.centre = float(self.fine_map.shape[0] // 2)

    def correlations(self, rotations):
        """Pearson correlations (Q,) of the map with itself sampled at ``Q @ r``: rotations (Q, 3, 3)."""
        rotations = np.ascontiguousarray(np.asarray(rotations, np.float64).reshape(-1, 3, 3))
        out = np.empty(len(rotations))
        rotated_correlations(self.fine_map, self.points, self.reference, rotations, float(_UPSAMPLING),
                             self.centre, out)
        return out

    def group_scores(self, orientations, elements):
        """Mean correlation over ``elements`` (e, 3, 3) conjugated by each orientation Q (m, 3, 3): (m,)."""
        orientations = np.asarray(orientations, np.float64).reshape(-1, 3, 3)
        conjugated = np.einsum("mij,ejk,mlk->meil", orientations, elements, orientations)
        return self.correlations(conjugated.reshape(-1, 3, 3)).reshape(len(orientations), -1).mean(axis=1)


# ---------------------------------------------------------------- the search

def _axis_candidates(self_rotation, order, step_deg, count):
    """Up to ``count`` directions (k, 3) where the map best agrees with its n-fold rotations, 3 steps apart."""
    angles, _ = asymmetric_unit_directions("C1", step_deg)
    directions = projection_direction(angles[:, 0], angles[:, 1])
    directions = directions[directions[:, 2] >= -1e-9]  # u and -u are one axis
    turns = np.radians(360.0 * np.arange(1, order // 2 + 1) / order)  # k and n - k score the same
    rotvecs = directions[:, None, :] * turns[None, :, None]
    scores = self_rotation.correlations(Rotation.from_rotvec(rotvecs.reshape(-1, 3)).as_matrix())
    scores = scores.reshape(len(directions), len(turns)).mean(axis=1)
    kept = []
    for i in np.argsort(-scores):
        if all(abs(directions[i] @ directions[j]) < np.cos(np.radians(3 * step_deg)) for j in kept):
            kept.append(i)
            if len(kept) == count:
                break
    return directions[kept]


def _refine(self_rotation, elements, start, step_deg):
    """Nelder-Mead over a rotation vector (deg) applied to ``start`` (3, 3): (best Q, its score)."""
    def negative_score(omega_deg):
        turn = Rotation.from_rotvec(np.radians(omega_deg)).as_matrix()
        return -self_rotation.group_scores(turn @ start, elements)[0]

    simplex = np.vstack([np.zeros(3), 0.5 * step_deg * np.eye(3)])
    found = scipy.optimize.minimize(negative_score, np.zeros(3), method="Nelder-Mead",
                                    options={"initial_simplex": simplex, "xatol": 0.05, "fatol": 1e-6,
                                             "maxiter": 400})
    return Rotation.from_rotvec(np.radians(found.x)).as_matrix() @ start, -float(found.fun)


def _search(coarse, fine, symmetry, step_deg, n_candidates, n_refined=2):
    """The orientation Q = R^T (3, 3) maximising the group score, and that score.

    coarse, fine : :class:`SelfRotation` of the map at two samplings: the global steps score on
    ``coarse``, the ``n_refined`` best starts are refined on ``fine``.
    """
    operators = symmetry_operators(symmetry)
    elements = _scored_elements(operators)
    order, primary = _primary_axis(symmetry)
    cyclic = all(abs(g[2, 2] - 1.0) < 1e-9 for g in operators)  # C<n>: nothing depends on the turn about z
    psis = [0.0] if cyclic else np.arange(0.0, 360.0 / order, step_deg)
    starts = []
    for u in _axis_candidates(coarse, order, step_deg, n_candidates):
        onto = _rotation_taking(primary, u)
        turns = Rotation.from_rotvec(np.radians(psis)[:, None] * u[None, :]).as_matrix()
        orientations = turns @ onto
        scores = coarse.group_scores(orientations, elements)
        starts.append((scores.max(), orientations[np.argmax(scores)]))
    best_q, best_score = None, -np.inf
    for _, start in sorted(starts, key=lambda s: -s[0])[:n_refined]:
        q, score = _refine(fine, elements, start, step_deg)
        if score > best_score:
            best_q, best_score = q, score
    return best_q, best_score


def _working_map(volume, pixel_size_A, working_A, resolution_A):
    """The map Fourier-cropped to voxels of about ``working_A`` and low-passed to ``resolution_A`` or, if
    None or finer, to the new Nyquist: (float32 (n, n, n), the achieved voxel size in Angstrom)."""
    working, working_A = resample_volume(np.asarray(volume, np.float32), pixel_size_A, working_A)
    limit_A = 2.0 * working_A if resolution_A is None else max(resolution_A, 2.0 * working_A)
    return low_pass(working, limit_A, working_A), working_A


def _check_inputs(volume, pixel_size_A, resolution_A, max_box, step_deg):
    volume = np.asarray(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise PrimeInputError(f"expected a cubic 3D map, got shape {volume.shape} (z, y, x)")
    if not np.isfinite(volume).all():
        raise PrimeInputError("the map holds NaN or infinite values")
    if volume.min() == volume.max():
        raise PrimeInputError(f"the map is blank (every voxel {float(volume.flat[0]):g}): nothing to align")
    for name, value in (("pixel_size_A", pixel_size_A), ("resolution_A", resolution_A), ("step_deg", step_deg)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise PrimeInputError(f"{name} must be a positive number, got {value!r}", parameter=name)
    if int(max_box) != max_box or max_box < 16:
        raise PrimeInputError(f"max_box must be a whole number of voxels >= 16, got {max_box!r}", parameter="max_box")


def find_symmetry_axes(volume, pixel_size_A, symmetry, resolution_A=None, max_box=40, step_deg=5.0,
                       n_candidates=4, recentre=True, apply_symmetry=False):
    """Find the rotation that brings a map's symmetry axes onto RELION's for ``symmetry``.

    Parameters
    ----------
    volume : array_like, (N, N, N), [z, y, x]
        The map, any orientation, centre at N // 2.
    pixel_size_A : float
        Its voxel size, Angstrom.
    symmetry : str
        Point group as :func:`symmetry.symmetry_operators` names it (C<n>, D<n>, T, O, I...).
    resolution_A : float, optional
        The search uses the map low-passed to this resolution (Angstrom); default the working
        box's Nyquist (twice the working voxel size).
    max_box : int
        Largest working box (voxels); the working voxel is max(pixel_size_A, N pixel_size_A /
        max_box, resolution_A / 2).
    step_deg : float
        Angular step of the global search (degrees); the local refinement goes below it.
    n_candidates : int
        Highest-order axis directions kept from step 2 (module docstring) and refined.
    recentre : bool
        Move the centre of mass to the box centre first (RELION's default; its --keep_centre
        is ``recentre=False``).
    apply_symmetry : bool
        Return the aligned map averaged over G (RELION's --apply_sym).

    Returns
    -------
    SymmetryAlignment

    Raises
    ------
    PrimeInputError
        For a non-cubic, blank or non-finite map, an unknown group, a non-positive pixel size,
        resolution or step, or ``max_box`` < 16.
    """
    _check_inputs(volume, pixel_size_A, resolution_A, max_box, step_deg)
    operators = symmetry_operators(symmetry)
    volume = np.asarray(volume, np.float32)
    box = volume.shape[0]
    shift_zyx = recentring_shift(volume) if recentre else np.zeros(3)
    centred = shifted_volume(volume, shift_zyx) if np.any(shift_zyx) else volume.astype(np.float64)

    working_A = max(float(pixel_size_A), box * float(pixel_size_A) / int(max_box),
                    0.0 if resolution_A is None else resolution_A / 2.0)
    working, working_A = _working_map(centred, pixel_size_A, working_A, resolution_A)
    if len(operators) == 1:
        rotation, search_score = np.eye(3), 1.0
    else:
        coarse_A = max(working_A, working.shape[0] * working_A / _COARSE_BOX)
        coarse, _ = _working_map(working, working_A, coarse_A, resolution_A)
        q, search_score = _search(SelfRotation(coarse, coarse.shape[0] // 2 - 1),
                                  SelfRotation(working, working.shape[0] // 2 - 1),
                                  symmetry, float(step_deg), int(n_candidates))
        # g R aligns the map as well as R does (w is G-symmetric): return the one nearest the identity.
        mates = operators @ q.T
        rotation = mates[np.argmax(np.einsum("gii->g", mates))]

    symmetrised = symmetrise_volume(centred, symmetry, rotation)
    aligned = rotate_volume(centred, rotation)
    return SymmetryAlignment(
        rotation=rotation, euler_deg=matrix_to_euler(rotation), score=sphere_correlation(aligned, symmetrised),
        search_score=float(search_score), volume=symmetrised if apply_symmetry else aligned,
        shift_px=shift_zyx[::-1].copy(), working_pixel_size_A=float(working_A), working_box=working.shape[0])
