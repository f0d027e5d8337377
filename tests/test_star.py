"""STAR reading and writing: lossless round trips, RELION 3.0 -> 3.1 as relion_convert_star does it.

Oracles: starfile's own reading of the original file, emtable's reading of ours,
and relion_convert_star's conversion of the same 3.0 files.
"""

import shutil

import emtable
import numpy as np
import pandas as pd
import pytest
import starfile

from prime_plugin.cli import main as prime
from prime_plugin.core import PrimeInputError, read_particles, write_particles
from prime_plugin.core.star import read_star_blocks, write_star_blocks

STAR_31 = "star/sample_particles_relion31.star"
STAR_30 = ["star/sample_particles_relion30.star", "star/sample_relion_symmetry_group_D4.star",
           "real/empiar10076_7ptcl/empiar_10076_7.star"]
ALL_STARS = [STAR_31, *STAR_30]


def assert_frames_equal(ours, reference, atol=0.0):
    """Same columns in the same order, same row order, same strings, same numbers (to atol)."""
    assert list(ours.columns) == list(reference.columns)
    assert len(ours) == len(reference)
    for column in reference.columns:
        a, b = ours[column].to_numpy(), reference[column].to_numpy()
        if b.dtype.kind in "iuf":
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=0, atol=atol, err_msg=column)
        else:
            assert [str(x) for x in a] == [str(x) for x in b], column


def copy_star_with_stacks(shared_data, relative, folder):
    """Copy a shared STAR file and the stacks beside it into ``folder``; return the copy."""
    source = shared_data / relative
    for item in source.parent.iterdir():
        shutil.copy(item, folder / item.name)
    return folder / source.name


@pytest.mark.parametrize("relative", ALL_STARS)
def test_every_shared_star_round_trips(shared_data, tmp_path, relative):
    table = read_particles(shared_data / relative)
    write_particles(table, tmp_path / "out.star")
    again = read_particles(tmp_path / "out.star")
    assert not again.converted_from_30
    assert_frames_equal(again.particles, table.particles)
    assert_frames_equal(again.optics, table.optics)
    assert list(again.other_blocks) == list(table.other_blocks)
    for name, block in table.other_blocks.items():
        assert_frames_equal(again.other_blocks[name], block)


def test_relion31_file_keeps_every_block_column_and_value(shared_data, tmp_path):
    """The 3.1 sample with two more blocks (key-value and loop) appended: all come back unchanged."""
    text = (shared_data / STAR_31).read_text()
    text += "\ndata_general\n\n_rlnReferenceDimensionality 3\n_rlnOriginalImageSize   200\n\n"
    text += (shared_data / STAR_30[1]).read_text()
    (tmp_path / "in.star").write_text(text)
    original = starfile.read(tmp_path / "in.star", always_dict=True)
    write_particles(read_particles(tmp_path / "in.star"), tmp_path / "out.star")
    written = starfile.read(tmp_path / "out.star", always_dict=True)
    assert list(written) == list(original) == ["optics", "particles", "general", "model_class_1"]
    assert written["general"] == original["general"]
    del original["general"]
    for name in original:
        assert_frames_equal(written[name], original[name])


def test_emtable_reads_our_file_as_we_do(shared_data, tmp_path):
    table = read_particles(shared_data / STAR_30[0])
    write_particles(table, tmp_path / "out.star")
    for block, frame in (("optics", table.optics), ("particles", table.particles)):
        rows = list(emtable.Table.iterRows(str(tmp_path / "out.star"), tableName=block))
        assert len(rows) == len(frame)
        for column in frame.columns:
            theirs = [getattr(row, column) for row in rows]
            ours = frame[column].to_numpy()
            if ours.dtype.kind in "iuf":
                np.testing.assert_array_equal(np.array(theirs, dtype=float), ours.astype(float), err_msg=column)
            else:
                assert [str(x) for x in theirs] == [str(x) for x in ours], column


def test_floats_are_written_exactly(tmp_path):
    values = np.array([0.1 + 0.2, 1e-12, -123456789.123456789, 2.0 / 3.0, 5e300, 0.0])
    blocks = {"things": pd.DataFrame({"rlnDefocusU": values, "rlnImageName": ["1@a.mrcs"] * len(values),
                                      "rlnClassNumber": np.arange(len(values))}),
              "general": {"rlnPixelSize": 1.0 / 3.0, "rlnComment": "two words"}}
    write_star_blocks(blocks, tmp_path / "x.star")
    back = read_star_blocks(tmp_path / "x.star")
    np.testing.assert_array_equal(back["things"]["rlnDefocusU"].to_numpy(), values)
    assert back["general"]["rlnPixelSize"] == 1.0 / 3.0
    assert back["general"]["rlnComment"] == "two words"


def test_empiar_particles_get_pixel_size_from_magnification(shared_data):
    table = read_particles(shared_data / "real/empiar10076_7ptcl/empiar_10076_7.star")
    # 5 um detector pixel at 38,168x magnification.
    np.testing.assert_allclose(table.pixel_size_A, 5e4 / 38168, rtol=1e-12)
    assert abs(table.pixel_size_A[0] - 1.31) < 1e-3
    assert table.optics["rlnImageSize"].tolist() == [320]


def test_relion30_shifts_become_angstrom(shared_data):
    raw = starfile.read(shared_data / STAR_30[0])
    table = read_particles(shared_data / STAR_30[0])
    pixel = raw["rlnDetectorPixelSize"].to_numpy() * 1e4 / raw["rlnMagnification"].to_numpy()
    np.testing.assert_allclose(table.shifts_A[:, 0], raw["rlnOriginX"].to_numpy() * pixel, rtol=1e-12)
    np.testing.assert_allclose(table.shifts_px[:, 1], raw["rlnOriginY"].to_numpy(), rtol=1e-12)


def compare_with_relion_conversion(ours_path, relion_path):
    ours = starfile.read(ours_path, always_dict=True)
    theirs = starfile.read(relion_path, always_dict=True)
    for block in ("optics", "particles"):
        # RELION drops image sizes when it cannot open a stack (.mrc stacks): compare what it wrote.
        common = [c for c in ours[block].columns if c in theirs[block].columns]
        assert set(theirs[block].columns) <= set(ours[block].columns), block
        assert_frames_equal(ours[block][common], theirs[block][common], atol=1e-5)


@pytest.mark.relion
@pytest.mark.parametrize("relative", STAR_30)
def test_convert_star_matches_relion_convert_star(shared_data, tmp_path, relion, relative):
    star = copy_star_with_stacks(shared_data, relative, tmp_path)
    relion("relion_convert_star", "--i", star.name, "--o", "relion.star", cwd=tmp_path)
    assert prime(["convert-star", "--i", str(star), "--o", str(tmp_path / "ours.star")]) == 0
    compare_with_relion_conversion(tmp_path / "ours.star", tmp_path / "relion.star")


@pytest.mark.relion
def test_convert_star_groups_optics_like_relion(shared_data, tmp_path, relion):
    """Three set-ups (two magnifications, two voltages) interleaved: groups and shifts as RELION makes them."""
    raw = starfile.read(shared_data / STAR_30[0])
    raw["rlnMagnification"] = np.where(np.arange(len(raw)) % 3 == 0, 50000.0, 37369.207031)
    raw["rlnVoltage"] = np.where(np.arange(len(raw)) % 2 == 0, 300.0, 200.0)
    raw["rlnOriginX"] = np.linspace(-7.5, 6.25, len(raw))
    shutil.copy(shared_data / "star/sample.mrcs", tmp_path / "sample.mrcs")
    starfile.write({"": raw}, tmp_path / "in30.star")
    relion("relion_convert_star", "--i", "in30.star", "--o", "relion.star", cwd=tmp_path)
    assert prime(["convert-star", "--i", str(tmp_path / "in30.star"), "--o", str(tmp_path / "ours.star")]) == 0
    compare_with_relion_conversion(tmp_path / "ours.star", tmp_path / "relion.star")
    assert len(read_particles(tmp_path / "ours.star").optics) == 4


def test_missing_pixel_size_needs_angpix(shared_data, tmp_path):
    raw = starfile.read(shared_data / STAR_30[0]).drop(columns=["rlnMagnification"])
    starfile.write(raw, tmp_path / "nopix.star")
    with pytest.raises(PrimeInputError, match="no pixel size"):
        read_particles(tmp_path / "nopix.star")
    np.testing.assert_allclose(read_particles(tmp_path / "nopix.star", pixel_size_A=2.5).pixel_size_A, 2.5)
