"""Bad input: one line on stderr naming the file and the problem, exit status 2, nothing written.

Each case runs the real ``prime`` command in a subprocess, as a user would.
"""

import subprocess
import sys

import mrcfile
import numpy as np
import pytest


def prime(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "prime_plugin.cli", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(result, *fragments):
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
1 opticsGroup1 2.0 {box} 300.0

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
_rlnDefocusU #3
{rows}
"""


@pytest.fixture
def dataset(tmp_path):
    """A valid 3-particle data set: stack.mrcs (3 x 16 x 16) and particles.star."""
    def make(box=16, names=("1@stack.mrcs", "2@stack.mrcs", "3@stack.mrcs"), pixels=None):
        data = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32) if pixels is None else pixels
        with mrcfile.new(tmp_path / "stack.mrcs", overwrite=True) as mrc:
            mrc.set_data(data)
        rows = "\n".join(f"{name} 1 10000.0" for name in names)
        (tmp_path / "particles.star").write_text(STAR.format(box=box, rows=rows))
        return tmp_path / "particles.star"
    return make


def test_valid_dataset_passes_check(dataset, tmp_path):
    dataset()
    code, out, err = prime("check", "--i", "particles.star", cwd=tmp_path)
    assert code == 0, err
    assert "3 particles, box 16 px" in out


def test_missing_stack_file(dataset, tmp_path):
    dataset(names=("1@stack.mrcs", "1@gone.mrcs"))
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path), "particles.star", "gone.mrcs", "not found")


def test_truncated_stack(dataset, tmp_path):
    dataset()
    stack = tmp_path / "stack.mrcs"
    with open(stack, "r+b") as f:
        f.truncate(stack.stat().st_size - 100)
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path), "stack.mrcs", "truncated",
                          "3 images of 16 x 16")


def test_image_index_past_end_of_stack(dataset, tmp_path):
    dataset(names=("1@stack.mrcs", "4@stack.mrcs"))
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path), "4@stack.mrcs", "past the end", "3 images")


def test_star_without_required_columns(dataset, tmp_path):
    path = dataset()
    path.write_text(path.read_text().replace("_rlnImageName #1", "_rlnMicrographName #1"))
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path), "particles.star", "rlnImageName")
    assert_one_line_error(prime("convert-star", "--i", "particles.star", "--o", "out.star", cwd=tmp_path),
                          "particles.star", "rlnImageName")
    assert not (tmp_path / "out.star").exists()


def test_optics_table_without_pixel_size(dataset, tmp_path):
    path = dataset()
    path.write_text(path.read_text().replace("_rlnImagePixelSize", "_rlnMicrographPixelSize"))
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path), "particles.star", "rlnImagePixelSize")


@pytest.mark.parametrize("content", [b"\x00\x01MRC binary\x00" * 50, b"just some notes\nnot a table\n", b""])
def test_star_that_is_not_a_star(tmp_path, content):
    (tmp_path / "notes.star").write_bytes(content)
    (tmp_path / "out.star").write_text("precious")
    assert_one_line_error(prime("convert-star", "--i", "notes.star", "--o", "out.star", cwd=tmp_path),
                          "notes.star", "not a STAR file")
    assert (tmp_path / "out.star").read_text() == "precious"


def test_missing_star_file(tmp_path):
    assert_one_line_error(prime("check", "--i", "nothing.star", cwd=tmp_path), "nothing.star", "not found")


def test_optics_box_differs_from_stack_box(dataset, tmp_path):
    dataset(box=32)
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path),
                          "particles.star", "rlnImageSize [32]", "16 x 16")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_pixels(dataset, tmp_path, bad):
    pixels = np.zeros((3, 16, 16), dtype=np.float32)
    pixels[2, 5, 7] = bad
    dataset(pixels=pixels)
    assert_one_line_error(prime("check", "--i", "particles.star", cwd=tmp_path), "stack.mrcs", "image 3", "NaN or infinite")


def test_volume_box_differs_from_particles(dataset, tmp_path):
    dataset()
    with mrcfile.new(tmp_path / "ref.mrc") as mrc:
        mrc.set_data(np.zeros((20, 20, 20), dtype=np.float32))
    assert_one_line_error(prime("check", "--i", "particles.star", "--ref", "ref.mrc", cwd=tmp_path),
                          "ref.mrc", "box 20", "box 16")


def test_volume_that_is_not_mrc(dataset, tmp_path):
    dataset()
    (tmp_path / "ref.mrc").write_text("hello")
    assert_one_line_error(prime("check", "--i", "particles.star", "--ref", "ref.mrc", cwd=tmp_path),
                          "ref.mrc", "not an MRC volume")


@pytest.mark.parametrize("name", ["X3", "C0", "D", "", "Q"])
def test_unknown_symmetry_name(tmp_path, name):
    assert_one_line_error(prime("symmetry", "--sym", name, cwd=tmp_path), "symmetry", repr(name))


def test_output_not_overwritten_onto_input(dataset, tmp_path):
    path = dataset()
    before = path.read_text()
    assert_one_line_error(prime("convert-star", "--i", "particles.star", "--o", "particles.star", cwd=tmp_path),
                          "refusing to overwrite")
    assert path.read_text() == before


def test_unwritable_output_is_one_line(dataset, tmp_path):
    dataset()
    assert_one_line_error(prime("convert-star", "--i", "particles.star", "--o", "no/such/dir/out.star", cwd=tmp_path),
                          "No such file or directory")
