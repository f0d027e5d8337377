"""Scipion objects <-> RELION STAR files for the PRIME engine (needs Scipion's pwem).

The only place where Scipion's conventions meet RELION's. The alignment follows
scipion-em-relion's convert31 exactly (../shared/docs/SCIPION.md): a particle's
``Transform`` is the inverse of ``[[A, -s], [0, 1]]`` with A RELION's Euler matrix and s
the origin in pixels; the matrix algebra itself lives in
:mod:`prime_plugin.core.geometry` (``projection_transform_from_pose`` and its inverse).
CTF: rlnDefocusU/V (A), rlnDefocusAngle (deg), rlnPhaseShift (deg) when set.
Optics: the acquisition's RELION optics table when the set carries one (sets imported
from RELION do), else one group made from the acquisition; the pixel size and image
size always come from the set.
"""

import io
import os

import numpy as np
import pandas as pd
from emtable import Table

from pwem.constants import ALIGN_PROJ, NO_INDEX
from pwem.objects import Float, Integer, Transform

from prime_plugin.core.geometry import pose_from_projection_transform, projection_transform_from_pose
from prime_plugin.core.star import ParticleTable, read_particles, read_star_blocks, write_particles

# Image formats the engine reads directly (memory-mapped MRC); Scipion may add ":mrcs".
MRC_EXTENSIONS = (".mrc", ".mrcs", ".st")
# Per-particle RELION labels Scipion keeps as "_rln..." attributes (scipion-em-relion's list).
EXTRA_LABELS = ["rlnCtfBfactor", "rlnCtfScalefactor", "rlnGroupName", "rlnGroupNumber", "rlnRandomSubset"]
# Refinement figures stored on each output particle: STAR column -> (attribute, type).
REFINED_ATTRIBUTES = {"rlnPrimeCorrelation": ("_primeCorrelation", Float),
                      "rlnPrimeContrast": ("_primeContrast", Float),
                      "rlnMaxValueProbDistribution": ("_rlnMaxValueProbDistribution", Float),
                      "rlnRandomSubset": ("_rlnRandomSubset", Integer)}


def stack_path(filename):
    """The file behind a Scipion image location (Scipion may append ':mrcs' or ':mrc')."""
    return filename.split(":")[0] if filename else filename


def non_mrc_stacks(particles, limit=3):
    """Up to ``limit`` image files of ``particles`` the engine cannot read (not MRC)."""
    bad = []
    for name in particles.getFiles():
        if not stack_path(name).lower().endswith(MRC_EXTENSIONS):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def missing_stacks(particles, limit=3):
    """Up to ``limit`` image files of ``particles`` that do not exist."""
    return [name for name in particles.getFiles() if not os.path.exists(stack_path(name))][:limit]


def particles_to_star(particles, star_path, with_alignment=True, with_ctf=True):
    """Write a SetOfParticles as a RELION 3.1 particle STAR file; return the row count.

    Image names are written relative to the STAR file's folder (the engine resolves them
    from there). With ``with_alignment`` and a set carrying a projection alignment, the
    angles and origins are written (rlnAngleRot/Tilt/Psi in deg, rlnOrigin*Angst in A);
    with ``with_ctf`` and a set with CTF, the defocus columns (no CTF columns: no CTF
    correction in the engine).
    """
    star_dir = os.path.dirname(os.path.abspath(star_path))
    pixel_size = particles.getSamplingRate()
    write_alignment = with_alignment and particles.getAlignment() == ALIGN_PROJ
    first = particles.getFirstItem()
    extra = [label for label in EXTRA_LABELS if first.hasAttribute("_" + label)]
    columns = {name: [] for name in ["rlnImageName", "rlnImageId", "rlnOpticsGroup"]}
    ctf_columns = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"]
    has_ctf = with_ctf and particles.hasCTF()
    transforms = []
    for column in (ctf_columns if has_ctf else []) + extra + ["rlnMicrographName"]:
        columns[column] = []
    for particle in particles.iterItems(orderBy="id"):
        index, filename = particle.getLocation()
        name = os.path.relpath(os.path.abspath(stack_path(filename)), star_dir)
        columns["rlnImageName"].append(f"{index:06d}@{name}" if index != NO_INDEX else name)
        columns["rlnImageId"].append(particle.getObjId())
        columns["rlnOpticsGroup"].append(int(particle.getAttributeValue("_rlnOpticsGroup", 1)))
        if has_ctf:
            ctf = particle.getCTF()
            u, v, angle = ctf.getDefocus()
            phase = ctf.getPhaseShift()
            for column, value in zip(ctf_columns, (u, v, angle, 0.0 if phase is None else phase)):
                columns[column].append(float(value))
        for label in extra:
            columns[label].append(particle.getAttributeValue("_" + label))
        coordinate = particle.getCoordinate()
        columns["rlnMicrographName"].append((coordinate.getMicName() or "") if coordinate is not None else "")
        if write_alignment:
            transforms.append(particle.getTransform().getMatrix())
    if not any(columns["rlnMicrographName"]):
        del columns["rlnMicrographName"]
    table = pd.DataFrame(columns)
    if write_alignment:
        rot, tilt, psi, origin_px = pose_from_projection_transform(np.array(transforms))
        table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
        table["rlnOriginXAngst"] = origin_px[:, 0] * pixel_size
        table["rlnOriginYAngst"] = origin_px[:, 1] * pixel_size
    write_particles(ParticleTable(particles=table, optics=optics_table(particles)), star_path)
    return len(table)


def optics_table(particles):
    """RELION optics rows of a SetOfParticles (pixel size and box from the set itself)."""
    acquisition = particles.getAcquisition()
    stored = getattr(acquisition, "opticsGroupInfo", None)
    optics = None
    if stored is not None and stored.get():
        table = Table()
        table.readStar(io.StringIO(stored.get()), tableName="optics")
        optics = pd.DataFrame([row._asdict() for row in table])
    if optics is None or optics.empty:
        optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                               "rlnVoltage": [acquisition.getVoltage()],
                               "rlnSphericalAberration": [acquisition.getSphericalAberration()],
                               "rlnAmplitudeContrast": [acquisition.getAmplitudeContrast()]})
    optics["rlnImagePixelSize"] = float(particles.getSamplingRate())
    optics["rlnImageSize"] = int(particles.getXDim())
    optics["rlnImageDimensionality"] = 2
    return optics


class RefinedParticleUpdater:
    """Copies the refined pose and figures of run_data.star onto Scipion particles.

    Use as ``updateItemCallback`` of ``SetOfParticles.copyItems``: rows are matched to
    particles by rlnImageId (the input particle ids, written by :func:`particles_to_star`).
    """

    def __init__(self, run_data_star):
        table = read_particles(run_data_star)
        frame = table.particles
        self.pixel_size = table.pixel_size_A
        transforms = projection_transform_from_pose(frame["rlnAngleRot"], frame["rlnAngleTilt"],
                                                    frame["rlnAnglePsi"], table.shifts_px)
        ids = frame["rlnImageId"].to_numpy(int)
        self._row_of_id = {int(i): k for k, i in enumerate(ids)}
        self._transforms = transforms
        self._figures = {column: frame[column].to_numpy() for column in REFINED_ATTRIBUTES if column in frame}

    def __len__(self):
        return len(self._row_of_id)

    def __call__(self, particle, row=None):
        k = self._row_of_id.get(int(particle.getObjId()))
        if k is None:  # not refined (absent from run_data.star): leave it out of the output
            particle._appendItem = False
            return
        particle.setTransform(Transform(self._transforms[k]))
        for column, values in self._figures.items():
            attribute, kind = REFINED_ATTRIBUTES[column]
            setattr(particle, attribute, kind(values[k].item()))


def fsc_from_model_star(model_star):
    """The gold-standard FSC of run_model.star: spatial frequency (1/A) and FSC, shape (n,)."""
    shells = read_star_blocks(model_star)["model_class_1"]
    return (shells["rlnResolution"].to_numpy(float), shells["rlnGoldStandardFsc"].to_numpy(float))
