"""Symmetry operators (against relion_refine --print_symmetry_ops) and the
asymmetric-unit projection directions (coverage and separation on the sphere)."""

import re

import numpy as np
import pytest

from prime_plugin.core.directions import asymmetric_unit_directions, canonical_mates, directions_for_count
from prime_plugin.core.errors import PrimeInputError
from prime_plugin.core.geometry import projection_direction
from prime_plugin.core.symmetry import symmetry_operators, symmetry_order

ORDERS = {"C1": 1, "C2": 2, "C4": 4, "D2": 4, "D7": 14, "T": 12, "O": 24, "I": 60,
          "I1": 60, "I2": 60, "I3": 60, "I4": 60, "c13": 13, "d1": 2}


def parse_relion_operators(text):
    """Matrices of the ``R(k)=`` blocks printed by relion_refine, shape (n, 3, 3)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*R\(\d+\)=", line)]
    return np.array([[[float(x) for x in lines[i + row].split()] for row in (1, 2, 3)] for i in starts])


def max_set_distance(a, b):
    """Largest distance from an element of one set of matrices to the nearest of the other."""
    d = np.abs(a[:, None] - b[None]).max(axis=(2, 3))
    return max(d.min(axis=1).max(), d.min(axis=0).max())


@pytest.mark.relion
@pytest.mark.parametrize("name", ["C1", "C4", "D2", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"])
def test_operators_match_relion(relion, tmp_path, name):
    printed = relion("relion_refine", "--print_symmetry_ops", "--sym", name, cwd=tmp_path)
    theirs = parse_relion_operators(printed)
    ours = symmetry_operators(name)
    assert len(theirs) == len(ours) == ORDERS[name]
    # RELION prints about 5 significant digits, so 1e-6 is out of reach for T and I.
    assert max_set_distance(ours, theirs) < 1e-5


EXPAND_STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnImageDimensionality #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
1 opticsGroup1 1.0 64 2 300 2.7 0.1

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
_rlnAngleRot #3
_rlnAngleTilt #4
_rlnAnglePsi #5
1@a.mrcs 1 0 0 0
"""


@pytest.mark.relion
@pytest.mark.parametrize("name", ["C2", "C4", "D2", "D7", "T", "O", "I"])  # RELION refuses to expand C1
def test_operators_match_relion_symmetry_expansion_to_1e6(relion, tmp_path, name):
    """relion_particle_symmetry_expand of a particle at the identity lists every operator (or its
    inverse: a group holds both) as Euler angles printed to 1e-6 degrees, so matrices compare to 1e-6."""
    import starfile

    from prime_plugin.core.geometry import euler_to_matrix

    (tmp_path / "one.star").write_text(EXPAND_STAR)
    relion("relion_particle_symmetry_expand", "--i", "one.star", "--o", "expanded.star", "--sym", name, cwd=tmp_path)
    angles = starfile.read(tmp_path / "expanded.star")["particles"][["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]]
    theirs = euler_to_matrix(*angles.to_numpy(dtype=float).T)
    ours = symmetry_operators(name)
    assert len(theirs) == len(ours) == ORDERS[name]
    assert max_set_distance(ours, theirs) < 1e-6


def test_icosahedral_settings_differ_and_plain_i_is_i2():
    ops = {name: symmetry_operators(name) for name in ["I", "I1", "I2", "I3", "I4"]}
    assert max_set_distance(ops["I"], ops["I2"]) < 1e-12
    for a, b in [("I1", "I2"), ("I2", "I3"), ("I3", "I4"), ("I1", "I4")]:
        assert max_set_distance(ops[a], ops[b]) > 0.1


@pytest.mark.parametrize("name, order", sorted(ORDERS.items()))
def test_group_order_and_closure(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3) and symmetry_order(name) == order
    np.testing.assert_allclose(ops[0], np.eye(3), atol=1e-15)
    np.testing.assert_allclose(ops @ ops.transpose(0, 2, 1), np.broadcast_to(np.eye(3), ops.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(ops), 1.0, atol=1e-12)
    products = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 3, 3)
    assert max_set_distance(products, ops) < 1e-9  # closed: every product is in the set
    distinct = np.abs(ops[:, None] - ops[None]).max(axis=(2, 3)) + 10 * np.eye(order)
    assert distinct.min() > 1e-3  # no duplicates


@pytest.mark.parametrize("name", ["X3", "C0", "D", "", "C", "I5", "D-2", "C2.5", "O2", "T1"])
def test_unknown_group_is_rejected_in_one_line(name):
    with pytest.raises(PrimeInputError) as info:
        symmetry_operators(name)
    assert str(info.value) == f"unknown symmetry group '{name}' (expected C<n>, D<n>, T, O or I)"
    with pytest.raises(PrimeInputError):
        symmetry_order(name)


# ------------------------------------------------------------ directions

def unit_vectors(n, seed):
    x = np.random.default_rng(seed).normal(size=(n, 3))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def all_mates(name, angles_deg):
    """Every symmetry mate of the returned directions, shape (order * m, 3)."""
    d = projection_direction(angles_deg[:, 0], angles_deg[:, 1])
    return np.einsum("kij,nj->kni", symmetry_operators(name), d).reshape(-1, 3)


def angle_deg(cosine):
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


GRIDS = [("C1", 15.0), ("C4", 7.5), ("D2", 7.5), ("D7", 5.0), ("T", 5.0), ("O", 3.75),
         ("I", 3.75), ("I3", 7.5), ("C17", 3.75)]


@pytest.mark.parametrize("name, step", GRIDS)
def test_mates_cover_the_sphere(name, step):
    angles, achieved = asymmetric_unit_directions(name, step)
    assert angles.ndim == 2 and angles.shape[1] == 2
    assert np.all((angles[:, 1] >= 0) & (angles[:, 1] <= 180))
    nearest = angle_deg((unit_vectors(2000, seed=7) @ all_mates(name, angles).T).max(axis=1))
    assert nearest.max() <= 1.5 * step
    # The whole sphere is shared out: m * order directions at about one per step^2.
    expected = 4 * np.pi / np.radians(step) ** 2 / symmetry_order(name)
    assert 0.85 * expected <= len(angles) <= 1.2 * expected + 1
    assert achieved == pytest.approx(np.degrees(np.sqrt(4 * np.pi / (len(angles) * symmetry_order(name)))))


@pytest.mark.parametrize("name, step", GRIDS)
def test_no_two_directions_are_mates(name, step):
    angles, _ = asymmetric_unit_directions(name, step)
    d = projection_direction(angles[:, 0], angles[:, 1])
    mates = np.einsum("kij,nj->nki", symmetry_operators(name), d)  # (m, order, 3)
    cosines = np.einsum("nki,mi->nkm", mates, d)
    m = len(d)
    cosines[np.arange(m), :, np.arange(m)] = -1.0  # a direction against its own mates
    assert angle_deg(cosines.max()) >= 0.4 * step


@pytest.mark.parametrize("name, step", GRIDS)
def test_directions_lie_in_one_asymmetric_unit(name, step):
    """Each returned direction is its own canonical mate (gap fillers included)."""
    angles, _ = asymmetric_unit_directions(name, step)
    d = projection_direction(angles[:, 0], angles[:, 1])
    assert np.all(canonical_mates(d, symmetry_operators(name)) == 0)


@pytest.mark.parametrize("name, n_space", [("C1", 1000), ("D7", 300), ("O", 200), ("I", 100), ("C4", 5000)])
def test_directions_for_count(name, n_space):
    angles, achieved = directions_for_count(name, n_space)
    assert abs(len(angles) - n_space) <= 0.1 * n_space
    assert achieved == pytest.approx(np.degrees(np.sqrt(4 * np.pi / (n_space * symmetry_order(name)))), rel=0.05)


@pytest.mark.parametrize("bad", [0.0, -5.0, float("nan")])
def test_bad_step_is_rejected(bad):
    with pytest.raises(PrimeInputError, match="angular step"):
        asymmetric_unit_directions("C1", bad)
