"""Particle images made by relion_project with known angles, shifts and CTFs (test oracle data).

The clean projections come from RELION's own program; noise is added here, white
and Gaussian, at an SNR defined as in the issues: the mean variance of the clean
CTF-modulated projections over the whole box divided by the noise variance.
"""

from dataclasses import dataclass

import mrcfile
import numpy as np
import pandas as pd
import starfile
from scipy.spatial.transform import Rotation

from prime_plugin.core.ctf import CtfParams
from prime_plugin.core.geometry import euler_to_matrix, matrix_to_euler


@dataclass
class RelionDataset:
    """Clean images (n, N, N) float32 with their true angles (n, 3) deg, origins (n, 2) px, defocus (n, 3)."""

    clean: np.ndarray
    angles_deg: np.ndarray
    origins_px: np.ndarray
    defocus: np.ndarray
    pixel_size_A: float

    def noisy(self, snr, seed):
        """The images with white Gaussian noise at ``snr``, float32."""
        sigma = np.sqrt(self.clean.var(axis=(1, 2)).mean() / snr)
        rng = np.random.default_rng(seed)
        return (self.clean + sigma * rng.standard_normal(self.clean.shape)).astype(np.float32)

    def ctf(self):
        """CtfParams of the images: their defocus, at the optics of write_projection_star (300 kV, Cs 2.7 mm, 0.1)."""
        n = len(self.defocus)
        return CtfParams(*self.defocus.T, np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1))


def random_poses(n, seed, max_shift_px):
    """Uniform random orientations (n, 3) deg and origins (n, 2) px uniform in a disc."""
    rng = np.random.default_rng(seed)
    angles = np.stack(matrix_to_euler(Rotation.random(n, random_state=seed).as_matrix()), axis=1)
    radius = max_shift_px * np.sqrt(rng.uniform(0, 1, n))
    direction = rng.uniform(0, 2 * np.pi, n)
    return angles, np.column_stack([radius * np.cos(direction), radius * np.sin(direction)])


def perturbed_poses(angles_deg, origins_px, degrees, shift_px, seed):
    """Each orientation (n, 3) deg turned by exactly ``degrees`` about a random axis, and each origin
    (n, 2) px moved by exactly ``shift_px`` in a random direction: the input of a local refinement."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(len(angles_deg), 3))
    axes *= np.radians(degrees) / np.linalg.norm(axes, axis=1, keepdims=True)
    turned = Rotation.from_rotvec(axes).as_matrix() @ euler_to_matrix(*np.asarray(angles_deg).T)
    direction = rng.uniform(0, 2 * np.pi, len(angles_deg))
    moved = np.asarray(origins_px) + shift_px * np.column_stack([np.cos(direction), np.sin(direction)])
    return np.column_stack(matrix_to_euler(turned)), moved


def astigmatic_defocus(n, seed):
    """(n, 3) (U, V, angle): U uniform in 1-3 um (in A), V = U x 0.9-1.0, angle uniform in 0-180 deg."""
    rng = np.random.default_rng(seed)
    defocus_u = rng.uniform(10000, 30000, n)
    return np.column_stack([defocus_u, defocus_u * rng.uniform(0.9, 1.0, n), rng.uniform(0, 180, n)])


def write_projection_star(path, angles_deg, origins_px, defocus, box, pixel_size_A):
    """A RELION 3.1 STAR for relion_project --ang; defocus (n, 3) = (U, V, angle) or None."""
    n = len(angles_deg)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [pixel_size_A], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1}@dummy.mrcs" for i in range(n)],
                              "rlnAngleRot": angles_deg[:, 0], "rlnAngleTilt": angles_deg[:, 1],
                              "rlnAnglePsi": angles_deg[:, 2],
                              "rlnOriginXAngst": origins_px[:, 0] * pixel_size_A,
                              "rlnOriginYAngst": origins_px[:, 1] * pixel_size_A, "rlnOpticsGroup": 1})
    if defocus is not None:
        particles["rlnDefocusU"], particles["rlnDefocusV"], particles["rlnDefocusAngle"] = defocus.T
    starfile.write({"optics": optics, "particles": particles}, path, float_format="%.8f")


def relion_projections(relion, folder, volume, pixel_size_A, angles_deg, origins_px, defocus=None):
    """Project ``volume`` with relion_project at the given poses (with --ctf when defocus is given).

    Angles, origins and defocus are read back from the STAR as written (rounded), so the
    returned truth is exactly what RELION used.
    """
    box = volume.shape[0]
    with mrcfile.new(folder / "map.mrc", overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, np.float32))
        mrc.voxel_size = pixel_size_A
    write_projection_star(folder / "poses.star", angles_deg, origins_px, defocus, box, pixel_size_A)
    args = ["--i", "map.mrc", "--o", "proj", "--ang", "poses.star", "--angpix", pixel_size_A]
    relion("relion_project", *args, *(["--ctf"] if defocus is not None else []), cwd=folder)
    written = starfile.read(folder / "poses.star")["particles"]
    angles = written[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64)
    origins = written[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / pixel_size_A
    written_defocus = None if defocus is None else written[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()
    clean = mrcfile.read(folder / "proj.mrcs").astype(np.float32)
    return RelionDataset(clean, angles, origins, written_defocus, pixel_size_A)


def write_particle_stack(folder, images, data, with_angles=False, name="particles"):
    """Write images (n, N, N) as ``name``.mrcs and a RELION 3.1 ``name``.star with CTF columns.

    The STAR carries the optics, image names, defocus and rlnRandomSubset (alternating);
    angles and origins only when ``with_angles`` (a refinement's input has neither).
    """
    n, box = len(images), images.shape[-1]
    with mrcfile.new(folder / f"{name}.mrcs", overwrite=True) as mrc:
        mrc.set_data(np.asarray(images, np.float32))
        mrc.voxel_size = data.pixel_size_A
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [data.pixel_size_A], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{name}.mrcs" for i in range(n)], "rlnOpticsGroup": 1,
                              "rlnRandomSubset": np.arange(n) % 2 + 1})
    if data.defocus is not None:
        particles["rlnDefocusU"], particles["rlnDefocusV"], particles["rlnDefocusAngle"] = data.defocus.T
    if with_angles:
        particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = data.angles_deg.T
        particles["rlnOriginXAngst"] = data.origins_px[:, 0] * data.pixel_size_A
        particles["rlnOriginYAngst"] = data.origins_px[:, 1] * data.pixel_size_A
    starfile.write({"optics": optics, "particles": particles}, folder / f"{name}.star", float_format="%.8f")
    return folder / f"{name}.star"


def refinement_data(relion, shared_data, folder, n_particles, snr, seed, box=64, pixel_size_A=5.0):
    """A refinement test set in ``folder``: relion_project images of the shared ribosome map.

    Uniform random orientations, origins up to 4 px, astigmatic CTF (U 1-3 um), white noise at
    ``snr``. Writes input.star (no angles), truth.star (true poses), their stack and truth.mrc
    (the map, cropped to ``box``). Returns the RelionDataset (true poses) and the map.
    """
    volume = np.ascontiguousarray(mrcfile.read(shared_data / "ribosome70S_65px.mrc")[:box, :box, :box])
    angles, origins = random_poses(n_particles, seed=seed, max_shift_px=4.0)
    data = relion_projections(relion, folder, volume, pixel_size_A, angles, origins,
                              astigmatic_defocus(n_particles, seed + 1))
    noisy = data.noisy(snr, seed=seed + 2)
    write_particle_stack(folder, noisy, data, with_angles=False, name="input")
    write_particle_stack(folder, noisy, data, with_angles=True, name="truth")
    with mrcfile.new(folder / "truth.mrc", overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = pixel_size_A
    return data, volume
