"""The refinement's human report: FSC, orientation distribution and convergence plots (PNG).

matplotlib is imported with the Agg backend inside each function, so the engine
never needs a display.
"""

import numpy as np

from prime_plugin.core.atomic_files import atomic_output


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with atomic_output(path) as temporary:
        fig.savefig(temporary, format="png", dpi=110, bbox_inches="tight")


def fsc_plot(path, curve, box, pixel_size_A):
    """FSC between the half maps against resolution (A), with the 0.143 and 0.5 lines."""
    from prime_plugin.core.fourier import resolution_at

    plt = _figure()
    shells = np.arange(len(curve))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(shells[1:], curve[1:], color="tab:blue", label="half map 1 vs half map 2")
    for level, colour in ((0.143, "tab:red"), (0.5, "tab:orange")):
        res = resolution_at(curve, level, box, pixel_size_A)
        ax.axhline(level, color=colour, lw=0.8, ls="--", label=f"FSC = {level}: {res:.1f} A")
    ticks = np.linspace(1, len(curve) - 1, 6).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{box * pixel_size_A / k:.1f}" for k in ticks])
    ax.set_xlabel("resolution (A)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Gold-standard FSC")
    _save(fig, path)
    plt.close(fig)


def angular_distribution_plot(path, angles_deg, symmetry_ops=None):
    """Projection directions of the particles (rot, tilt) as a 2D histogram on a sinusoidal map."""
    plt = _figure()
    rot = np.radians(((angles_deg[:, 0] + 180.0) % 360.0) - 180.0)
    tilt = np.radians(angles_deg[:, 1])
    latitude = np.pi / 2 - tilt
    fig = plt.figure(figsize=(7, 4))
    ax = fig.add_subplot(111, projection="mollweide")
    counts, rot_edges, lat_edges = np.histogram2d(rot, latitude, bins=(72, 36),
                                                  range=((-np.pi, np.pi), (-np.pi / 2, np.pi / 2)))
    mesh = ax.pcolormesh(rot_edges, lat_edges, counts.T, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, shrink=0.6, label="particles")
    ax.set_title(f"Orientation distribution ({len(angles_deg)} particles; rot across, tilt down)")
    ax.grid(True, lw=0.3)
    ax.set_yticks(np.radians([-60, -30, 0, 30, 60]))
    ax.set_yticklabels(["tilt 150", "120", "90", "60", "tilt 30"], fontsize=8)
    ax.set_xticklabels([])
    _save(fig, path)
    plt.close(fig)


def convergence_plot(path, history):
    """Resolution (A), % of the search space visited and orientation change (deg) per iteration."""
    plt = _figure()
    it = [h["iteration"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    axes[0].plot(it, [h["resolution_A"] for h in history], "o-", label="FSC 0.143")
    axes[0].plot(it, [h["next_limit_A"] for h in history], "s--", ms=3, label="next alignment limit")
    axes[0].set_ylabel("resolution (A)")
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8)
    axes[1].plot(it, [100 * h["fraction_visited"] for h in history], "o-", color="tab:green")
    axes[1].set_ylabel("search space visited (%)")
    axes[1].set_ylim(0, 105)
    axes[2].plot(it, [h["orientation_change_deg"] for h in history], "o-", color="tab:purple")
    axes[2].set_ylabel("orientation change (deg)")
    axes[2].set_xlabel("iteration")
    fig.suptitle("Convergence")
    _save(fig, path)
    plt.close(fig)
