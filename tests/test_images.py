"""Lazy particle images: RELION's name resolution, stack formats, chunked reading."""

import os

import mrcfile
import numpy as np
import pandas as pd
import pytest

from prime_plugin.core import ParticleImages, ParticleTable, read_particles, read_volume, write_volume
from prime_plugin.core.images import split_image_name


def make_table(names, source, box=None):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0]})
    if box is not None:
        optics["rlnImageSize"] = [box]
    particles = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1})
    return ParticleTable(particles, optics, {}, source)


def write_stack(path, images, mode_float16=False):
    data = images.astype(np.float16 if mode_float16 else np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
    return data


def test_split_image_name():
    assert split_image_name("000123@Extract/job1/a.mrcs") == (122, "Extract/job1/a.mrcs")
    assert split_image_name("single.mrc") == (0, "single.mrc")


def test_names_resolve_against_working_directory_first(tmp_path, monkeypatch):
    """RELION looks relative to the project directory (cwd) before the STAR file's folder."""
    rng = np.random.default_rng(0)
    (tmp_path / "project" / "Extract").mkdir(parents=True)
    (tmp_path / "star_dir" / "Extract").mkdir(parents=True)
    in_project = write_stack(tmp_path / "project/Extract/s.mrcs", rng.normal(size=(3, 8, 8)))
    beside_star = write_stack(tmp_path / "star_dir/Extract/s.mrcs", rng.normal(size=(3, 8, 8)))
    only_beside = write_stack(tmp_path / "star_dir/Extract/t.mrcs", rng.normal(size=(2, 8, 8)))
    table = make_table(["2@Extract/s.mrcs", "1@Extract/t.mrcs"], tmp_path / "star_dir/p.star")
    monkeypatch.chdir(tmp_path / "project")
    images = ParticleImages(table).read([0, 1])
    np.testing.assert_array_equal(images[0], in_project[1])
    np.testing.assert_array_equal(images[1], only_beside[0])
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(ParticleImages(table).read([0])[0], beside_star[1])


def test_float16_stack_reads_as_float32(tmp_path):
    data = write_stack(tmp_path / "h.mrcs", np.random.default_rng(1).normal(size=(4, 10, 10)), mode_float16=True)
    assert mrcfile.open(tmp_path / "h.mrcs").header.mode == 12
    images = ParticleImages(make_table([f"{i}@h.mrcs" for i in (4, 1)], tmp_path / "p.star", box=10))
    out = images.read([0, 1])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data[[3, 0]].astype(np.float32))


def test_real_mrc_stack_and_chunks_in_order(shared_data):
    """EMPIAR-10076 particles are an .mrc stack named N@file.mrc; chunks return every image in order."""
    table = read_particles(shared_data / "real/empiar10076_7ptcl/empiar_10076_7.star")
    reference = mrcfile.read(shared_data / "real/empiar10076_7ptcl/empiar_10076_7.mrc")
    with ParticleImages(table) as images:
        assert images.box == 320
        seen = [(rows, chunk) for rows, chunk in images.chunks(chunk_size=3)]
    assert [len(rows) for rows, _ in seen] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([c for _, c in seen]), reference)


def test_single_image_files(tmp_path):
    for k in range(2):
        write_stack(tmp_path / f"img{k}.mrc", np.full((1, 6, 6), float(k)))
    out = ParticleImages(make_table(["img0.mrc", "img1.mrc"], tmp_path / "p.star")).read([1, 0])
    assert out[0].mean() == 1.0 and out[1].mean() == 0.0


def test_many_stacks_with_few_open(tmp_path):
    """More stacks than may stay open at once: reading still returns the right images."""
    stacks = [write_stack(tmp_path / f"s{k}.mrcs", np.full((2, 4, 4), float(k))) for k in range(5)]
    names = [f"{i % 2 + 1}@s{k}.mrcs" for k in range(5) for i in range(2)]
    images = ParticleImages(make_table(names, tmp_path / "p.star"), max_open_stacks=2)
    order = np.random.default_rng(2).permutation(len(names))
    out = images.read(order)
    np.testing.assert_array_equal(out.mean(axis=(1, 2)), order // 2)
    assert len(stacks) == 5


@pytest.mark.relion
def test_volume_round_trip_and_header_like_relion(tmp_path, relion):
    """Our map header places the map as RELION's own writer does (ChimeraX uses these fields)."""
    volume = np.random.default_rng(3).normal(size=(12, 12, 12)).astype(np.float32)
    write_volume(tmp_path / "ours.mrc", volume, 3.5)
    back, voxel = read_volume(tmp_path / "ours.mrc")
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(3.5)
    relion("relion_image_handler", "--i", "ours.mrc", "--o", "relion.mrc", "--angpix", "3.5", cwd=tmp_path)
    ours = mrcfile.open(tmp_path / "ours.mrc").header
    theirs = mrcfile.open(tmp_path / "relion.mrc").header
    for field in ("nx", "ny", "nz", "mode", "nxstart", "nystart", "nzstart", "mx", "my", "mz",
                  "mapc", "mapr", "maps"):
        assert int(ours[field]) == int(theirs[field]), field
    for field in ("cella", "cellb", "origin"):
        np.testing.assert_allclose(np.array(ours[field].tolist()), np.array(theirs[field].tolist()), err_msg=field)
    np.testing.assert_allclose(float(ours.rms), float(volume.std()), rtol=1e-4)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "ours.mrc").st_mode & 0o777 == 0o666 & ~umask  # a new file's permissions
