"""Bad input and faults, tried as a hostile but realistic user would (issue 15).

Every case of the catalogue runs a real ``prime`` command line on a small data set spoiled
one way, and checks the README's promise: exit status 2 (1 for a run that cannot go on), one
line on stderr naming the file or option and the problem, no traceback, and nothing written
(the folder's files, hidden ones included, are the same before and after). Cases on the
particle data are also given to ``prime check``, which must refuse them the same way: it runs
the same checks as the commands. The faults (a full disk, Ctrl-C, SIGTERM at several
moments, kill -9) must leave a folder that a plain rerun or --continue uses, and a continued
run must end bit for bit where the uninterrupted run ends.

The data are made here: a map of Gaussian blobs (box 24, 5 A/px) and 40 particles simulated
from it with CTFs, so that each case runs in a fraction of a second. The commands run in this
process (``prime_plugin.cli.main``, as the ``prime`` script runs it), the signal tests in
processes of their own. Python warnings raised during a command count as lines on stderr.
"""

import errno
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from prime_plugin.cli import main
from prime_plugin.core.mrc import write_volume
from prime_plugin.core.simulate import simulate_particles
from prime_plugin.core.star import read_star_blocks, write_star_blocks

BOX, APIX, N = 24, 5.0, 40
STAR, STACK, REF = "particles.star", "particles.mrcs", "ref.mrc"
# A short refinement: 3 iterations of half the particles against 30 directions, one thread.
REFINE = ["--nspace", "30", "--max_iter", "3", "--update_frac", "0.5", "--seed", "1", "--j", "1"]
REFINE_RUN = ["refine", "--i", STAR, "--ref", REF, "--o", "run", *REFINE]


# ---------------------------------------------------------------- running prime and looking at folders

@contextmanager
def inside(folder):
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def prime(folder, *args, capsys):
    """Run ``prime ARGS`` in ``folder`` in this process: (exit status, stdout, stderr lines + warnings)."""
    with inside(folder), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse's refusals, as the prime script ends them
            code = stop.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines() + [f"warning: {w.message}" for w in caught]


def listing(folder):
    """{relative path: (size, mtime)} of every file under ``folder``, hidden ones included."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(folder).rglob("*") if p.is_file()}


def assert_one_line(result, status, fragments):
    code, _, lines = result
    assert code == status, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the data set and its spoiled variants

def blob_map(box=BOX, seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    volume = np.zeros((box,) * 3, np.float32)
    for centre in rng.uniform(-box / 5, box / 5, size=(6, 3)):
        volume += np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / 8.0)
    return volume


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """particles.star (RELION 3.1, CTF, angles, origins) + particles.mrcs (40 x 24 x 24) + ref.mrc (5 A/px)."""
    folder = tmp_path_factory.mktemp("catalogue")
    volume = blob_map()
    write_volume(folder / REF, volume, APIX)
    simulate_particles(volume, APIX, N, folder, snr=2.0, seed=3, max_shift_px=1.0, defocus_range_um=(1.0, 2.0))
    return folder


@pytest.fixture
def data(base, tmp_path):
    """A copy of the data set in a folder of this test's own."""
    for name in (STAR, STACK, REF):
        shutil.copy(base / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="session")
def finished(base, tmp_path_factory):
    """A complete short refinement (REFINE_RUN) in run/, made once: the result every continuation must give."""
    folder = tmp_path_factory.mktemp("finished")
    for name in (STAR, STACK, REF):
        shutil.copy(base / name, folder / name)
    with inside(folder):
        assert main(REFINE_RUN) == 0
    return folder


def copy_run(finished, folder):
    shutil.copytree(finished / "run", folder / "run")


def result_of(folder):
    """The final map and refined angles/origins of run/ in ``folder`` (arrays, for bitwise comparison)."""
    particles = read_star_blocks(folder / "run" / "run_data.star")["particles"]
    poses = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]]
    return mrcfile.read(folder / "run" / "run_class001.mrc"), poses.to_numpy()


def assert_same_result(folder, finished):
    map_here, poses_here = result_of(folder)
    map_there, poses_there = result_of(finished)
    np.testing.assert_array_equal(map_here, map_there)
    np.testing.assert_array_equal(poses_here, poses_there)


def set_value(column, row, value, block="particles", star=STAR):
    """A spoiler: ``column`` of (0-based) ``row`` of ``block`` set to ``value`` in the STAR file."""
    def spoil(folder):
        blocks = read_star_blocks(folder / star)
        frame = blocks[block]
        if isinstance(value, str):
            frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
        write_star_blocks(blocks, folder / star)
    return spoil


def drop_columns(*columns):
    def spoil(folder):
        blocks = read_star_blocks(folder / STAR)
        blocks["particles"] = blocks["particles"].drop(columns=list(columns))
        write_star_blocks(blocks, folder / STAR)
    return spoil


def column_twice(folder):
    lines = (folder / STAR).read_text().splitlines()
    labels = [i for i, line in enumerate(lines) if line.startswith("_rln")]
    last = labels[-1]
    rows = [i for i in range(last + 1, len(lines)) if lines[i].strip()]
    lines.insert(last + 1, f"_rlnDefocusU #{len(labels) - 2}")
    for i in rows:
        lines[i + 1] += " 12000.0"
    (folder / STAR).write_text("\n".join(lines) + "\n")


def cut_mid_row(folder):
    text = (folder / STAR).read_text().rstrip("\n")
    last_row = text.rsplit("\n", 1)[1]
    (folder / STAR).write_text(text[:len(text) - len(last_row) // 2])


def relion30(folder):
    """particles30.star: the data set as a RELION 3.0 file (one table, magnification and detector pixel)."""
    blocks = read_star_blocks(folder / STAR)
    optics, particles = blocks["optics"], blocks["particles"]
    old = particles.drop(columns=["rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"])
    old["rlnOriginX"] = particles["rlnOriginXAngst"] / APIX
    old["rlnOriginY"] = particles["rlnOriginYAngst"] / APIX
    for column in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        old[column] = optics[column].iloc[0]
    old["rlnMagnification"], old["rlnDetectorPixelSize"] = 10000.0, APIX  # 5 um at 10,000x: 5 A
    write_star_blocks({"": old}, folder / "particles30.star")


def stack_pixels(change):
    def spoil(folder):
        with mrcfile.open(folder / STACK, "r+") as mrc:
            data = mrc.data.copy()
            change(data)
            mrc.set_data(data)
    return spoil


def header_word(name, word, value):
    """Spoil 32-bit header word ``word`` (0-based) of MRC file ``name`` (3: the mode)."""
    def spoil(folder):
        with open(folder / name, "r+b") as handle:
            handle.seek(4 * word)
            handle.write(np.int32(value).tobytes())
    return spoil


def truncate(name, by):
    def spoil(folder):
        path = folder / name
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - by)
    return spoil


def text_file(name, text="not a map"):
    def spoil(folder):
        (folder / name).write_text(text)
    return spoil


def map_file(name, volume, pixel_A=APIX, raw=False):
    def spoil(folder):
        if raw:  # mrcfile as it is, without our writer's conventions
            with mrcfile.new(folder / name, overwrite=True) as mrc:
                mrc.set_data(np.asarray(volume, np.float32))
                mrc.voxel_size = pixel_A
        else:
            write_volume(folder / name, volume, pixel_A)
    return spoil


def make_file(name, text=""):
    def spoil(folder):
        (folder / name).write_text(text)
    return spoil


def make_dir(name):
    def spoil(folder):
        (folder / name).mkdir(parents=True)
    return spoil


def several(*spoilers):
    def spoil(folder):
        for one in spoilers:
            one(folder)
    return spoil


def other_particles(folder):
    """other.star: the same 40 images with other angles (same particle count); fewer.star: 38 particles."""
    blocks = read_star_blocks(folder / STAR)
    blocks["particles"]["rlnAngleRot"] = blocks["particles"]["rlnAngleRot"][::-1].to_numpy()
    write_star_blocks(blocks, folder / "other.star")
    blocks = read_star_blocks(folder / STAR)
    blocks["particles"] = blocks["particles"].iloc[:38]
    write_star_blocks(blocks, folder / "fewer.star")


# ---------------------------------------------------------------- the catalogue

RECONSTRUCT = ["reconstruct", "--i", STAR, "--o", "map.mrc"]
REFINE_NEW = ["refine", "--i", STAR, "--ref", REF, "--o", "out", *REFINE]
CONTINUE = [*REFINE_RUN, "--continue"]


@dataclass
class Case:
    """One bad input: ``spoil(folder)`` makes it, ``args`` is the command line, ``fragments`` must be
    in the one line of stderr; ``check``: prime check --i STAR must refuse it too (data problems);
    ``run``: the folder holds the finished run first (continuations)."""

    name: str
    spoil: object
    args: list
    fragments: tuple
    check: bool = False
    run: bool = False
    status: int = 2


NAN, INF = float("nan"), float("inf")
CASES = [
    # Numbers in the STAR file: the crashes and silent wrong maps.
    Case("nan angle", set_value("rlnAngleRot", 4, NAN), RECONSTRUCT, (STAR, "row 5", "rlnAngleRot", "nan"), True),
    Case("inf angle", set_value("rlnAnglePsi", 0, -INF), RECONSTRUCT, (STAR, "rlnAnglePsi", "-inf"), True),
    Case("angle 1e30", set_value("rlnAngleTilt", 1, 1e30), REFINE_NEW, (STAR, "rlnAngleTilt", "1e+30"), True),
    Case("inf defocus", set_value("rlnDefocusU", 2, INF), [*RECONSTRUCT, "--ctf"], (STAR, "rlnDefocusU", "inf"), True),
    Case("nan defocus", set_value("rlnDefocusV", 2, NAN), REFINE_NEW, (STAR, "row 3", "rlnDefocusV", "nan"), True),
    Case("defocus 1 m", set_value("rlnDefocusU", 7, 1e10), REFINE_NEW, (STAR, "rlnDefocusU", "outside"), True),
    Case("voltage 0", set_value("rlnVoltage", 0, 0.0, "optics"), [*RECONSTRUCT, "--ctf"],
         (STAR, "data_optics row 1", "rlnVoltage is 0 kV", "outside"), True),
    Case("negative Cs", set_value("rlnSphericalAberration", 0, -2.7, "optics"), REFINE_NEW,
         (STAR, "rlnSphericalAberration", "-2.7"), True),
    Case("amplitude contrast 2", set_value("rlnAmplitudeContrast", 0, 2.0, "optics"), REFINE_NEW,
         (STAR, "rlnAmplitudeContrast"), True),
    Case("inf B-factor", set_value("rlnCtfBfactor", 3, INF), [*RECONSTRUCT, "--ctf"], (STAR, "rlnCtfBfactor"), True),
    Case("-inf origin", set_value("rlnOriginXAngst", 6, -INF), RECONSTRUCT, (STAR, "rlnOriginXAngst", "-inf"), True),
    Case("nan origin", set_value("rlnOriginYAngst", 6, NAN), REFINE_NEW, (STAR, "rlnOriginYAngst", "nan"), True),
    Case("origin 1e30", set_value("rlnOriginXAngst", 9, 1e30), RECONSTRUCT,
         (STAR, "row 10", "origin", "outside its 24 px image"), True),
    Case("origin 1e30 converting", set_value("rlnOriginYAngst", 9, 1e30),
         ["convert-star", "--i", STAR, "--o", "new.star"], (STAR, "row 10", "origin", "outside"), True),
    Case("negative pixel size", set_value("rlnImagePixelSize", 0, -5.0, "optics"), RECONSTRUCT,
         (STAR, "rlnImagePixelSize is -5 A", "outside"), True),
    Case("zero pixel size", set_value("rlnImagePixelSize", 0, 0.0, "optics"), REFINE_NEW,
         (STAR, "rlnImagePixelSize is 0 A"), True),
    Case("text in a number column", set_value("rlnDefocusU", 3, "abc"), REFINE_NEW,
         (STAR, "row 4", "rlnDefocusU is 'abc', not a number"), True),
    Case("text in an optics number", set_value("rlnVoltage", 0, "300kV", "optics"), [*RECONSTRUCT, "--ctf"],
         (STAR, "rlnVoltage is '300kV'"), True),
    Case("half-set 3", set_value("rlnRandomSubset", 0, 3), RECONSTRUCT, (STAR, "rlnRandomSubset"), True),
    Case("column declared twice", column_twice, REFINE_NEW, (STAR, "rlnDefocusU twice"), True),
    Case("cut off mid-row", cut_mid_row, RECONSTRUCT, (STAR, "row 40", "cut off"), True),
    Case("no CTF columns", drop_columns("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"), REFINE_NEW,
         (STAR, "no CTF parameters", "--no_ctf")),
    Case("no CTF columns, --ctf", drop_columns("rlnDefocusU"), [*RECONSTRUCT, "--ctf"], (STAR, "rlnDefocusU")),
    Case("no angles", drop_columns("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), RECONSTRUCT,
         (STAR, "rlnAngleRot")),
    Case("no angles, --local", drop_columns("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), [*REFINE_NEW, "--local"],
         (STAR, "rlnAngleRot", "--local")),
    Case("image past the end", set_value("rlnImageName", 0, f"000041@{STACK}"), RECONSTRUCT,
         (STAR, "000041@", "past the end", "40 images"), True),
    Case("missing stack", set_value("rlnImageName", 0, "000001@gone.mrcs"), REFINE_NEW,
         (STAR, "gone.mrcs", "not found"), True),
    Case("missing STAR", lambda folder: (folder / STAR).unlink(), RECONSTRUCT, (STAR, "not found"), True),
    Case("STAR of binary", make_file(STAR, "\0\1MRC\0" * 40), ["convert-star", "--i", STAR, "--o", "new.star"],
         (STAR, "not a STAR file"), True),
    # Images.
    Case("all images zero", stack_pixels(lambda d: d.fill(0)), [*RECONSTRUCT, "--ctf"],
         (STACK, "image 1 is blank"), True),
    Case("one image zero", stack_pixels(lambda d: d[4].fill(0)), REFINE_NEW, (STACK, "image 5 is blank"), True),
    Case("a NaN pixel", stack_pixels(lambda d: d.__setitem__((7, 3, 3), np.nan)), REFINE_NEW,
         (STACK, "image 8", "NaN or infinite"), True),
    Case("MRC mode 3 stack", header_word(STACK, 3, 3), RECONSTRUCT, (STACK, "MRC mode 3"), True),
    Case("truncated stack", truncate(STACK, 1000), REFINE_NEW, (STACK, "truncated"), True),
    Case("stack that is text", text_file(STACK), RECONSTRUCT, (STACK, "not an MRC image stack"), True),
    Case("stack without MRC signature", header_word(STACK, 52, 0), RECONSTRUCT,
         (STACK, "not an MRC image stack"), True),
    Case("box other than the optics'", set_value("rlnImageSize", 0, 32, "optics"), RECONSTRUCT,
         (STAR, "rlnImageSize [32]"), True),
    # Maps.
    Case("reference all zeros", map_file(REF, np.zeros((BOX,) * 3)), REFINE_NEW, (REF, "blank")),
    Case("reference with NaN", map_file(REF, np.full((BOX,) * 3, np.nan)), REFINE_NEW, (REF, "NaN")),
    Case("reference in mode 3", header_word(REF, 3, 3), REFINE_NEW, (REF, "MRC mode 3")),
    Case("reference of text", text_file(REF), REFINE_NEW, (REF, "not an MRC volume")),
    Case("reference at 500 A/px", map_file(REF, blob_map(), 500.0), REFINE_NEW,
         (REF, "resampling the reference from 500 A/px", "memory", "pixel size in its header")),
    Case("reference without pixel size, other box", map_file(REF, blob_map(32), 0.0, raw=True), REFINE_NEW,
         (REF, "box 32", "no pixel size")),
    Case("reference with negative pixel size", map_file(REF, blob_map(), -5.0, raw=True), REFINE_NEW,
         (REF, "-5", "not a positive number")),
    Case("solvent mask of zeros", map_file("mask.mrc", np.zeros((BOX,) * 3)),
         [*REFINE_NEW, "--solvent_mask", "mask.mrc"], ("mask.mrc", "all zeros")),
    Case("solvent mask of another box", map_file("mask.mrc", np.ones((16,) * 3)),
         [*REFINE_NEW, "--solvent_mask", "mask.mrc"], ("mask.mrc", "box 16")),
    # Options.
    Case("--nspace for a petabyte", None, [*REFINE_NEW, "--nspace", "1000000000"],
         ("--nspace 1000000000", "memory", "lower --nspace")),
    Case("--nspace 0", None, [*REFINE_NEW, "--nspace", "0"], ("--nspace must be at least 1",)),
    Case("--nspace not a number", None, [*REFINE_NEW, "--nspace", "many"], ("--nspace", "invalid int value")),
    Case("--ini_high nan", None, [*REFINE_NEW, "--ini_high", "nan"], ("--ini_high", "not a finite number")),
    Case("--sigma inf", None, [*REFINE_NEW, "--sigma", "inf"], ("--sigma", "not a finite number")),
    Case("--update_frac nan", None, [*REFINE_NEW, "--update_frac", "NaN"], ("--update_frac", "not a finite number")),
    Case("--particle_diameter 0", None, [*REFINE_NEW, "--particle_diameter", "0"],
         ("--particle_diameter must be positive",)),
    Case("--particle_diameter larger than the box", None, [*REFINE_NEW, "--particle_diameter", "500"],
         ("--particle_diameter 500",)),
    Case("--trs -1", None, [*REFINE_NEW, "--trs", "-1"], ("--trs must not be negative",)),
    Case("--trs beyond the box", None, [*REFINE_NEW, "--trs", "40"], ("--trs 40", "half the 24 px box")),
    Case("--seed -1", None, [*REFINE_NEW, "--seed", "-1"], ("--seed", ">= 0")),
    Case("--npeaks 0", None, [*REFINE_NEW, "--npeaks", "0"], ("--npeaks must be at least 1",)),
    Case("--max_iter 0", None, [*REFINE_NEW, "--max_iter", "0"], ("--max_iter", "at least 1")),
    Case("--sigma_ang without --local", None, [*REFINE_NEW, "--sigma_ang", "2"], ("--sigma_ang", "--local")),
    Case("--sigma_ang 0", None, [*REFINE_NEW, "--local", "--sigma_ang", "0"], ("--sigma_ang", "positive")),
    Case("--sym Q7", None, [*REFINE_NEW, "--sym", "Q7"], ("unknown symmetry group 'Q7'",)),
    Case("--j 0", None, [*RECONSTRUCT, "--j", "0"], ("--j must be at least 1",)),
    Case("--cluster bogus", None, [*REFINE_NEW, "--cluster", "slurm:2"], ("--cluster takes local:N",)),
    Case("--continue and --force", None, [*REFINE_NEW, "--continue", "--force"], ("exclude each other",)),
    Case("--maxres 0", None, [*RECONSTRUCT, "--maxres", "0"], ("--maxres must be positive",)),
    Case("--maxres inf", None, [*RECONSTRUCT, "--maxres", "inf"], ("--maxres", "not a finite number")),
    Case("--subset 3", None, [*RECONSTRUCT, "--subset", "3"], ("--subset must be 1 or 2",)),
    Case("--angpix -5 converting", None, ["convert-star", "--i", STAR, "--o", "new.star", "--angpix", "-5"],
         ("--angpix must be a positive number",)),
    Case("--angpix against the magnification", relion30,
         ["convert-star", "--i", "particles30.star", "--o", "new.star", "--angpix", "4"],
         ("particles30.star", "--angpix 4 A differs", "rlnMagnification")),
    Case("RELION 3.0 file with a NaN origin",
         several(relion30, set_value("rlnOriginX", 2, NAN, "", "particles30.star")),
         ["reconstruct", "--i", "particles30.star", "--o", "map.mrc"],
         ("particles30.star", "row 3", "rlnOriginX is nan px"), True),
    Case("RELION 3.0 file with magnification 0",
         several(relion30, set_value("rlnMagnification", 5, 0.0, "", "particles30.star")),
         ["convert-star", "--i", "particles30.star", "--o", "new.star"],
         ("particles30.star", "row 6", "rlnMagnification must be a positive number"), True),
    Case("--angpix against the optics", None, [*RECONSTRUCT, "--angpix", "4"], (STAR, "--angpix 4 A differs")),
    Case("simulate --voltage 0", None, ["simulate", "--map", REF, "--n", "5", "--o", "sim", "--voltage", "0"],
         ("voltage",)),
    Case("simulate a blank map", map_file("blank.mrc", np.zeros((BOX,) * 3)),
         ["simulate", "--map", "blank.mrc", "--n", "5", "--o", "sim"], ("blank.mrc", "blank")),
    Case("simulate at 0.001 A/px", None,
         ["simulate", "--map", REF, "--n", "5", "--o", "sim", "--rescale_angpix", "0.001"],
         (REF, "resampling the map", "memory")),
    Case("simulate a box of 100000", None, ["simulate", "--map", REF, "--n", "5", "--o", "sim", "--box", "100000"],
         ("box 100000", "memory")),
    # Outputs.
    Case("--o in a missing folder", None, ["reconstruct", "--i", STAR, "--o", "no/such/map.mrc"],
         ("no/such/map.mrc", "No such file or directory")),
    Case("--o naming a folder", make_dir("maps"), ["reconstruct", "--i", STAR, "--o", "maps"], ("maps", "is a folder")),
    Case("--o inside a file", None, ["reconstruct", "--i", STAR, "--o", f"{STAR}/map.mrc"], (STAR, "is a file")),
    Case("refine --o that is a file", make_file("out"), REFINE_NEW, ("out", "is a file, not a folder")),
    Case("refine --o under a file", make_file("busy"), [*REFINE_NEW[:-len(REFINE) - 2], "--o", "busy/run", *REFINE],
         ("busy/run", "busy is a file")),
    Case("refine --o unwritable", None, [*REFINE_NEW[:-len(REFINE) - 2], "--o", "/proc/prime-run", *REFINE],
         ("/proc/prime-run", "cannot write")),
    Case("convert-star onto its input", None, ["convert-star", "--i", STAR, "--o", STAR], ("refusing to overwrite",)),
    # A folder holding a run, and continuations.
    Case("rerun onto a finished run", None, REFINE_RUN, ("run", "already holds a refinement", "--force"), run=True),
    Case("--continue without a run", None, CONTINUE, ("run", "no complete iteration", "without --continue")),
    Case("--continue with another --sym", None, [*CONTINUE, "--sym", "C2"], ("--sym is 'C2' here but was 'C1'",),
         run=True),
    Case("--continue with another --nspace", None, [*CONTINUE, "--nspace", "40"], ("--nspace is 40", "was 30"),
         run=True),
    Case("--continue with another --seed", None, [*CONTINUE, "--seed", "2"], ("--seed is 2",), run=True),
    Case("--continue with --no_subgrid", None, [*CONTINUE, "--no_subgrid"], ("--no_subgrid is given here",), run=True),
    Case("--continue with --particle_diameter", None, [*CONTINUE, "--particle_diameter", "100"],
         ("--particle_diameter is 100.0 here but was not set",), run=True),
    Case("--continue with other angles, same count", other_particles, [*CONTINUE, "--i", "other.star"],
         ("--i: the particle STAR file's content differs",), run=True),
    Case("--continue with fewer particles", other_particles, [*CONTINUE, "--i", "fewer.star"],
         ("--i: the particle STAR file's content differs",), run=True),
    Case("--continue with another reference", map_file("other.mrc", blob_map(seed=1)),
         [*CONTINUE, "--ref", "other.mrc"], ("--ref: the starting map's content differs",), run=True),
    Case("--continue with a solvent mask", map_file("mask.mrc", np.ones((BOX,) * 3)),
         [*CONTINUE, "--solvent_mask", "mask.mrc"], ("--solvent_mask: a mask is given here but was not",), run=True),
]


# prime mask and prime postprocess (issue 18): half maps of the blob map with independent noise, a mask.
def half_maps(folder):
    """half1.mrc, half2.mrc (the blob map plus noise, seeded) and mask.mrc (a soft-edged 0..1 mask)."""
    rng = np.random.default_rng(5)
    volume = blob_map()
    for name in ("half1.mrc", "half2.mrc"):
        write_volume(folder / name, volume + 0.05 * rng.standard_normal(volume.shape), APIX)
    write_volume(folder / "mask.mrc", np.clip(2 * volume, 0, 1), APIX)


def with_half_maps(*spoilers):
    return several(half_maps, *spoilers)


POSTPROCESS = ["postprocess", "--i", "half1.mrc", "--mask", "mask.mrc", "--o", "post", "--adhoc_bfac", "-50"]
MASK = ["mask", "--i", REF, "--o", "mask_out.mrc", "--threshold", "0.5", "--soft_edge", "2"]
CASES += [
    Case("postprocess: half maps of different boxes", with_half_maps(map_file("small.mrc", blob_map(20))),
         [*POSTPROCESS, "--i2", "small.mrc"],
         ("small.mrc", "box 20 differs from half map 1's 24")),
    Case("postprocess: half maps of different pixel sizes", with_half_maps(map_file("apix.mrc", blob_map(), 4.0)),
         [*POSTPROCESS, "--i2", "apix.mrc"], ("apix.mrc", "pixel size 4 A in the header differs")),
    Case("postprocess: mask above 1", with_half_maps(map_file("mask.mrc", 1.5 * np.ones((BOX,) * 3))), POSTPROCESS,
         ("mask.mrc", "mask values must lie in [0, 1]", "1.5")),
    Case("postprocess: negative mask", with_half_maps(map_file("mask.mrc", -np.ones((BOX,) * 3))), POSTPROCESS,
         ("mask.mrc", "mask values must lie in [0, 1]", "-1")),
    Case("postprocess: mask of another box", with_half_maps(map_file("mask.mrc", np.ones((16,) * 3))), POSTPROCESS,
         ("mask.mrc", "mask box 16 differs from the half maps' 24")),
    Case("postprocess: missing half map", with_half_maps(lambda f: (f / "half2.mrc").unlink()), POSTPROCESS,
         ("half2.mrc", "file not found")),
    Case("postprocess: half map of text", with_half_maps(text_file("half2.mrc")), POSTPROCESS,
         ("half2.mrc", "not an MRC volume")),
    Case("postprocess: truncated half map", with_half_maps(truncate("half1.mrc", 1000)), POSTPROCESS,
         ("half1.mrc", "truncated")),
    Case("postprocess: mask in mode 3", with_half_maps(header_word("mask.mrc", 3, 3)), POSTPROCESS,
         ("mask.mrc", "MRC mode 3")),
    Case("postprocess: mask that is a folder", with_half_maps(make_dir("masks")), [*POSTPROCESS, "--mask", "masks"],
         ("masks", "is a folder")),
    Case("postprocess: --o that is a file", with_half_maps(make_file("post")), POSTPROCESS,
         ("post", "is a file, not a folder")),
    Case("postprocess: --o under a file", with_half_maps(make_file("busy")), [*POSTPROCESS, "--o", "busy/post"],
         ("busy/post", "busy is a file")),
    Case("mask: map of text", text_file(REF), MASK, (REF, "not an MRC volume")),
    Case("mask: missing map", lambda folder: (folder / REF).unlink(), MASK, (REF, "file not found")),
    Case("mask: truncated map", truncate(REF, 1000), MASK, (REF, "truncated")),
    Case("mask: --o under a file", make_file("busy"), [*MASK, "--o", "busy/mask.mrc"], ("busy/mask.mrc", "is a file")),
    Case("mask: --o onto its input", None, [*MASK, "--o", REF], (REF, "refusing to overwrite")),
    Case("mask: threshold above the map", None, [*MASK, "--threshold", "100"], (REF, "no voxel", "--threshold 100")),
]


def test_the_mask_and_postprocess_cases_spoil_good_data(data, capsys):
    """Unspoiled, the data of the cases above go through: each case's refusal is its spoiler's doing."""
    half_maps(data)
    for args in (POSTPROCESS, MASK):
        code, _, lines = prime(data, *args, capsys=capsys)
        assert code == 0 and not [line for line in lines if "error" in line], (args, lines)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_nothing_written(case, data, finished, capsys):
    if case.run:
        copy_run(finished, data)
    if case.spoil is not None:
        case.spoil(data)
    before = listing(data)
    line = assert_one_line(prime(data, *case.args, capsys=capsys), case.status, case.fragments)
    assert listing(data) == before, f"{case.name}: files changed ({line})"
    if case.check:
        checked = assert_one_line(prime(data, "check", "--i", case.args[2], capsys=capsys), 2, case.fragments[:1])
        assert checked.split(": error: ", 1)[1] == line.split(": error: ", 1)[1], (checked, line)
        assert listing(data) == before


def test_the_catalogue_names_distinct_cases():
    assert len({case.name for case in CASES}) == len(CASES) >= 80


# ---------------------------------------------------------------- no map of zeros or NaN, whatever the input

SILENTLY_WRONG_BEFORE = [  # inputs that gave a map of zeros or NaN with exit status 0, or a segmentation fault
    set_value("rlnDefocusU", 0, INF), set_value("rlnDefocusU", 0, NAN), set_value("rlnVoltage", 0, 0.0, "optics"),
    set_value("rlnOriginXAngst", 0, -INF), set_value("rlnOriginXAngst", 0, 1e30), set_value("rlnAngleRot", 0, NAN),
    set_value("rlnAngleTilt", 0, INF), stack_pixels(lambda d: d.fill(0)), set_value("rlnCtfScalefactor", 0, 0.0),
    set_value("rlnCtfBfactor", 0, 1e6)]


@pytest.mark.parametrize("spoil", SILENTLY_WRONG_BEFORE, ids=range(len(SILENTLY_WRONG_BEFORE)))
def test_no_command_writes_a_map_of_zeros_or_nan(spoil, data, capsys):
    spoil(data)
    for args in (RECONSTRUCT, [*RECONSTRUCT, "--ctf"], [*REFINE_NEW, "--max_iter", "2"]):
        code, _, lines = prime(data, *args, capsys=capsys)
        written = sorted(data.rglob("*.mrc"))
        for path in written:
            if path.name != REF:
                volume = mrcfile.read(path)
                assert np.isfinite(volume).all() and np.any(volume), (args, path)
        assert code == 2 and len(lines) == 1, (args, lines)


def test_refine_without_ctf_correction_is_asked_for_and_said(data, capsys):
    drop_columns("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")(data)
    code, _, lines = prime(data, *REFINE_NEW, "--max_iter", "2", "--no_ctf", capsys=capsys)
    assert code == 0, lines
    assert "CTF correction off (asked for)" in (data / "out" / "run.log").read_text()


def test_check_tells_what_refine_and_reconstruct_will_do(data, capsys):
    map_file("fine.mrc", np.pad(blob_map(), 12), APIX / 2)(data)  # 48 px at 2.5 A/px: refine resamples it
    code, out, lines = prime(data, "check", "--i", STAR, "--ref", "fine.mrc", capsys=capsys)
    assert code == 0 and lines == [], lines
    assert "40 particles, box 24 px" in out and "resampled from 2.5 A/px to the particles' 5 A/px and box 24" in out
    assert "prime refine: CTF correction on" in out and "memory" in out
    assert "prime reconstruct: ready, --ctf possible" in out
    drop_columns("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")(data)
    code, out, _ = prime(data, "check", "--i", STAR, capsys=capsys)
    assert code == 0 and "prime refine: needs --no_ctf" in out and "without --ctf only" in out


# ---------------------------------------------------------------- faults: the folder stays usable

@pytest.fixture
def disk_full_at(monkeypatch):
    """disk_full_at(k): the k-th map the engine writes from now on fails as on a full disk (ENOSPC, no file name)."""
    real = mrcfile.new
    calls = []

    def install(k):
        def new(path, *args, **kwargs):
            calls.append(path)
            if len(calls) == k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, *args, **kwargs)
        monkeypatch.setattr(mrcfile, "new", new)
    return install


def result_files(folder):
    return sorted(p.name for p in (folder / "run").glob("run_*"))


def test_a_full_disk_names_the_file_and_a_plain_rerun_works(data, finished, disk_full_at, capsys):
    disk_full_at(1)
    code, _, lines = prime(data, *REFINE_RUN, capsys=capsys)
    assert code == 2 and "run/run_it001_half1_class001_unfil.mrc: No space left on device" in lines[-1], lines
    assert "Traceback" not in "".join(lines)
    assert result_files(data) == [] and not list((data / "run").rglob(".*.tmp"))
    assert_one_line(prime(data, *CONTINUE, capsys=capsys), 2, ("no complete iteration", "without --continue"))
    code, _, lines = prime(data, *REFINE_RUN, capsys=capsys)
    assert code == 0, lines
    assert_same_result(data, finished)


def test_a_full_disk_later_is_continued_to_the_uninterrupted_result(data, finished, disk_full_at, capsys):
    disk_full_at(4)  # iteration 1's two half maps, then iteration 2's first
    code, _, lines = prime(data, *REFINE_RUN, capsys=capsys)
    assert code == 2 and "run_it002_half2_class001_unfil.mrc: No space left on device" in lines[-1], lines
    assert_one_line(prime(data, *REFINE_RUN, capsys=capsys), 2, ("already holds a refinement",))
    code, _, lines = prime(data, *CONTINUE, capsys=capsys)
    assert code == 0, lines
    assert_same_result(data, finished)


def send_at(monkeypatch, module, name, signum, when=lambda *args: True):
    """Send ``signum`` to this process the first time ``module.name`` is called with arguments that ``when`` accepts."""
    real = getattr(module, name)
    sent = []

    def wrapper(*args, **kwargs):
        if not sent and when(*args):
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return sent


def moment_in_search(monkeypatch, iteration):
    refine = importlib.import_module("prime_plugin.core.refine")  # the module (the package exports its function)
    return send_at(monkeypatch, refine, "search_chunk", signal.SIGTERM, lambda chunk, settings:
                   settings.iteration == iteration)


def moment_in_checkpoint(monkeypatch, iteration):
    from prime_plugin.core.reconstruct import FourierSums

    return send_at(monkeypatch, FourierSums, "save", signal.SIGTERM, lambda sums, path:
                   str(path).endswith(f"half2_it{iteration:03d}.npz"))


def moment_in_final_outputs(monkeypatch, iteration):
    import prime_plugin.core.refine_outputs as outputs

    return send_at(monkeypatch, outputs, "write_final", signal.SIGTERM)


def moment_of_ctrl_c(monkeypatch, iteration):
    import prime_plugin.core.refine_outputs as outputs

    return send_at(monkeypatch, outputs, "write_iteration", signal.SIGINT, lambda out, state, *rest:
                   state.iteration == iteration)


@pytest.mark.parametrize("moment, iteration, status, continued", [
    (moment_in_search, 1, 143, False),  # nothing complete: a plain rerun
    (moment_in_checkpoint, 2, 143, True),  # the sums of iteration 2 written, its state not: from iteration 1
    (moment_in_final_outputs, None, 143, True),
    (moment_of_ctrl_c, 3, 130, True),
], ids=["SIGTERM in the first search", "SIGTERM in a checkpoint", "SIGTERM in the final outputs",
        "Ctrl-C writing iteration 3"])
def test_an_interrupted_run_continues_to_the_uninterrupted_result(moment, iteration, status, continued, data,
                                                                  finished, monkeypatch, capsys):
    sent = moment(monkeypatch, iteration)
    code, _, lines = prime(data, *REFINE_RUN, capsys=capsys)
    assert sent and code == status, lines
    said = "stopped by SIGTERM" if status == 143 else "interrupted"
    assert said in lines[-1] and "Traceback" not in "".join(lines), lines
    assert ("continue with --continue" in lines[-1]) == continued, lines[-1]
    assert not [p for p in (data / "run").rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    code, _, lines = prime(data, *(CONTINUE if continued else REFINE_RUN), capsys=capsys)
    assert code == 0, lines
    assert_same_result(data, finished)


def test_force_clears_the_earlier_run_and_only_its_files(data, finished, capsys):
    copy_run(finished, data)
    (data / "run" / "notes.txt").write_text("mine")
    assert "run_it003_data.star" in result_files(data)
    code, _, lines = prime(data, *REFINE_RUN, "--max_iter", "2", "--force", capsys=capsys)
    assert code == 0, lines
    assert "run_it003_data.star" not in result_files(data) and "run_it002_data.star" in result_files(data)
    assert (data / "run" / "notes.txt").read_text() == "mine"


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(data, finished, capsys):
    copy_run(finished, data)
    run = data / "run"
    left = [run / ".run_it002_data.star.k1ll3d00.tmp", run / ".checkpoint" / ".checkpoint_state.npz.k1ll3d00.tmp",
            run / ".checkpoint" / ".checkpoint_half1_it002.npz.abcd_123.npz"]
    mine = [run / ".notes.txt.12345678.tmp", run / "draft.tmp"]
    for path in left + mine:
        path.write_bytes(b"half written")
    code, _, lines = prime(data, *CONTINUE, capsys=capsys)
    assert code == 0, lines
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in mine)
    assert_same_result(data, finished)


# ---------------------------------------------------------------- real signals to a real process

SLOW_ITERATIONS = (  # the prime command, with a pause before each iteration's files so a signal lands mid-run
    "import sys, time\n"
    "import prime_plugin.core.refine_outputs as outputs\n"
    "write = outputs.write_iteration\n"
    "def slowly(*args):\n"
    "    time.sleep(0.5)\n"
    "    return write(*args)\n"
    "outputs.write_iteration = slowly\n"
    "from prime_plugin.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def start_refine(folder):
    return subprocess.Popen([sys.executable, "-c", SLOW_ITERATIONS, *REFINE_RUN], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.02)


@pytest.mark.parametrize("signum, moment, status", [
    (signal.SIGTERM, "second iteration", 143),
    (signal.SIGKILL, "first iteration", -signal.SIGKILL),
], ids=["SIGTERM in the second iteration", "kill -9 in the first iteration"])
def test_a_signalled_process_continues_to_the_uninterrupted_result(signum, moment, status, data, finished, capsys):
    process = start_refine(data)
    if moment == "first iteration":
        wait_for(data / "run" / "run.log", process)
    else:
        wait_for(data / "run" / ".checkpoint" / "checkpoint_state.npz", process)
    time.sleep(0.3)
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    if signum == signal.SIGTERM:
        assert "stopped by SIGTERM" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    continued = moment != "first iteration"
    code, _, lines = prime(data, *(CONTINUE if continued else REFINE_RUN), capsys=capsys)
    assert code == 0, lines
    assert_same_result(data, finished)
