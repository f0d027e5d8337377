"""Make the demonstration map shipped with the package: beta-galactosidase (PDB 5A1A, CC0) at 64^3.

    pip install gemmi
    python tools/make_demo_map.py /path/to/5a1a.cif.gz prime_plugin/data/betagal_d2_64.mrc

:func:`model_map` makes the same kind of map at any box, pixel size and resolution
(benchmarks/bench_real.py uses it for the real-data reference).

The model's three 2-fold axes are found from its four chains (the rotation taking
chain A's C-alpha atoms onto chain B, C and D, by the Kabsch method) and turned onto
z, y and x, the axes RELION's D2 expects. Electron-scattering density (gemmi's
DensityCalculatorE) is computed at 8 A resolution on a 64^3 grid of 3.6 A voxels,
centred on the model's centre of mass at voxel 32, and written as float32 MRC.
Not used at run time; the package ships its output.
"""

import sys

import gemmi
import mrcfile
import numpy as np

BOX, PIXEL_A, RESOLUTION_A = 64, 3.6, 8.0


def ca_coordinates(chain):
    return {(r.seqid.num, r.seqid.icode): np.array(r["CA"][0].pos.tolist()) for r in chain if r.find_atom("CA", "*")}


def rotation_axis(source, target):
    """Axis (unit, 3) of the rotation best superposing point sets ``source`` onto ``target`` (n, 3)."""
    a = source - source.mean(0)
    b = target - target.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1, 1, d]) @ u.T
    values, vectors = np.linalg.eig(rotation)
    return np.real(vectors[:, np.argmin(np.abs(values - 1))])


def symmetry_frame(model):
    chains = {c.name: ca_coordinates(c) for c in model}
    common = set.intersection(*(set(c) for c in chains.values()))
    keys = sorted(common)
    points = {name: np.array([chains[name][k] for k in keys]) for name in chains}
    axes = [rotation_axis(points["A"], points[name]) for name in ("B", "C", "D")]
    axes = [a / np.linalg.norm(a) for a in axes]
    frame = np.array(axes)  # rows: the 2-folds; orthogonal for D2
    u, _, vt = np.linalg.svd(frame)
    frame = u @ vt  # the nearest exact rotation
    if np.linalg.det(frame) < 0:
        frame[0] *= -1
    # rows of frame map the axes onto x, y, z; put the third axis on z, the second on y, the first on x.
    return frame


def model_map(model_path, box, pixel_A, resolution_A):
    """Density of the model (first model, all chains), float32 (box, box, box) [z, y, x], maximum 1,
    its 2-fold axes on z, y and x and its centre of mass at voxel box // 2; ``resolution_A`` is
    gemmi's d_min."""
    structure = gemmi.read_structure(str(model_path))
    structure.setup_entities()
    model = structure[0]
    frame = symmetry_frame(model)
    centre = np.array(model.calculate_center_of_mass().tolist())
    shift = box // 2 * pixel_A
    transform = gemmi.Transform(gemmi.Mat33(frame.tolist()), gemmi.Vec3(*(shift - frame @ centre)))
    model.transform_pos_and_adp(transform)
    structure.cell = gemmi.UnitCell(box * pixel_A, box * pixel_A, box * pixel_A, 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    calculator = gemmi.DensityCalculatorE()
    calculator.d_min = resolution_A
    calculator.rate = 1.0
    calculator.set_grid_cell_and_spacegroup(structure)
    calculator.grid.set_size(box, box, box)  # zeros; add_... keeps this size (put_... would choose its own)
    calculator.add_model_density_to_grid(model)
    density = np.array(calculator.grid, copy=True).transpose(2, 1, 0)  # gemmi's [x, y, z] -> [z, y, x]
    return (density / density.max()).astype(np.float32)


def main(model_path, out_path):
    density = model_map(model_path, BOX, PIXEL_A, RESOLUTION_A)
    with mrcfile.new(out_path, overwrite=True) as mrc:
        mrc.set_data(density)
        mrc.voxel_size = PIXEL_A
    print(f"wrote {out_path}: {BOX}^3 at {PIXEL_A} A/px, 2-folds on x, y, z")


if __name__ == "__main__":
    main(*sys.argv[1:3])
