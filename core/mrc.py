"""MRC volumes (maps) read and written with their voxel size.

A volume is a float32 array ``v[z, y, x]`` (mrcfile's order) with a cubic box.
Maps are written as RELION writes them (mode 2, origin 0, nstart 0, axis order
x, y, z, space group 1, statistics in the header) so that ChimeraX places them
where RELION's own maps go; the file appears atomically (temporary name, rename).
"""

import warnings
from pathlib import Path

import mrcfile
import numpy as np

from prime_plugin.core.atomic_files import atomic_output
from prime_plugin.core.errors import PrimeInputError


# Bytes per pixel of the MRC modes of real-valued images (int8, int16, float32, uint16, float16).
BYTES_PER_VOXEL = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
_MODE_NAMES = {3: "complex int16", 4: "complex float32", 101: "4-bit"}


def mrc_header(path, what):
    """mrcfile's header of ``path`` read permissively, its warnings kept out of the output; PrimeInputError
    ("not an MRC ``what``", with the first warning as the reason) when the file is not one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
        except (ValueError, OSError) as exc:
            raise PrimeInputError(f"not an MRC {what} ({exc})", path) from None
    if header.map is None or header.map.tobytes()[:3] != b"MAP":
        reason = str(caught[0].message) if caught else "no MAP signature"
        raise PrimeInputError(f"not an MRC {what} ({reason})", path)
    return header


def check_real_mode(header, path, what):
    """Refuse an MRC mode that does not hold real numbers (complex, 4-bit or unknown modes)."""
    mode = int(header.mode)
    if mode not in BYTES_PER_VOXEL:
        kind = _MODE_NAMES.get(mode, "unknown")
        raise PrimeInputError(f"MRC mode {mode} ({kind}) is not a mode of real-valued {what}s; "
                              "modes 0, 1, 2, 6 and 12 are read", path)


def read_volume(path, expected_box=None):
    """Read a cubic MRC volume.

    Parameters
    ----------
    path : str or Path
    expected_box : int, optional
        Refuse a volume whose side differs (for instance from the particles' box).

    Returns
    -------
    volume : ndarray, float32, shape (box, box, box), order [z, y, x]
    voxel_size_A : float
        From the header; 0.0 when the header does not say.
    """
    path = Path(path)
    if path.is_dir():
        raise PrimeInputError("is a folder, not an MRC map", path)
    if not path.is_file():
        raise PrimeInputError("file not found", path)
    header = mrc_header(path, "volume")
    check_real_mode(header, path, "map")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    expected = 1024 + int(header.nsymbt) + nx * ny * max(nz, 1) * BYTES_PER_VOXEL[int(header.mode)]
    size = path.stat().st_size
    if size < expected:
        raise PrimeInputError(f"truncated: {size} bytes where the header announces a {nx} x {ny} x {nz} map "
                              f"({expected} bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the header is known good; mrcfile's remarks are not for the user
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise ValueError("no data")
                volume = np.asarray(mrc.data, dtype=np.float32).copy()
                voxel_size_A = float(mrc.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise PrimeInputError(f"not an MRC volume ({exc})", path) from None
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise PrimeInputError(f"expected a cubic 3D map, found shape {volume.shape} (z, y, x)", path)
    if expected_box is not None and volume.shape[0] != expected_box:
        raise PrimeInputError(
            f"map box {volume.shape[0]} differs from the particles' box {expected_box}", path)
    if not np.isfinite(volume).all():
        raise PrimeInputError("map holds NaN or infinite voxels", path)
    if not np.isfinite(voxel_size_A) or voxel_size_A < 0:
        raise PrimeInputError(f"the header's pixel size is {voxel_size_A:g} A, not a positive number", path)
    return volume, voxel_size_A


def write_volume(path, volume, voxel_size_A):
    """Write ``volume`` (float array (z, y, x)) as an MRC map with voxel size in Angstrom, atomically."""
    path = Path(path)
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"write_volume expects a 3D array (z, y, x), got shape {volume.shape}")
    with atomic_output(path) as temporary:
        with mrcfile.new(temporary, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = float(voxel_size_A)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
            mrc.header.ispg = 1
            mrc.update_header_stats()
