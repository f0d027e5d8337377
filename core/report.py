"""The refinement's human report: FSC, orientation distribution and convergence plots.

Each plot has a ``draw_*`` function that draws on a given matplotlib Figure (the Scipion
viewer draws into its own windows with it) and a ``*_plot`` function that writes the
PNG. The PNGs are drawn on a bare Figure with the Agg canvas, so the engine never
needs a display and never touches pyplot's global state.
"""

import numpy as np

from prime_plugin.core.atomic_files import atomic_output


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    with atomic_output(path) as temporary:
        fig.savefig(temporary, format="png", dpi=110, bbox_inches="tight")


def fsc_plot(path, curve, box, pixel_size_A):
    """Write the FSC plot (PNG) of :func:`draw_fsc`."""
    fig = _new_figure((6, 4))
    draw_fsc(fig, curve, box, pixel_size_A)
    _save(fig, path)


def draw_fsc(fig, curve, box, pixel_size_A):
    """FSC between the half maps (per shell, shape (box//2+1,)) against resolution (A), with the 0.143 and 0.5 lines."""
    from prime_plugin.core.fourier import resolution_at

    shells = np.arange(len(curve))
    ax = fig.add_subplot(111)
    ax.plot(shells[1:], curve[1:], color="tab:blue", label="half map 1 vs half map 2")
    for level, colour in ((0.143, "tab:red"), (0.5, "tab:orange")):
        res = resolution_at(curve, level, box, pixel_size_A)
        ax.axhline(level, color=colour, lw=0.8, ls="--", label=f"FSC = {level}: {res:.1f} A")
    _fsc_axes(ax, len(curve), box, pixel_size_A)
    ax.set_title("Gold-standard FSC")


def _fsc_axes(ax, n_shells, box, pixel_size_A):
    """Shells 1..n_shells-1 labelled in A, the FSC axis from -0.1 to 1.05, the legend: every FSC plot's frame."""
    ticks = np.linspace(1, n_shells - 1, 6).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{box * pixel_size_A / k:.1f}" for k in ticks])
    ax.set_xlabel("resolution (A)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(loc="lower left", fontsize=8)


def angular_distribution_plot(path, angles_deg, symmetry_ops=None):
    """Write the orientation distribution plot (PNG) of :func:`draw_angular_distribution`."""
    fig = _new_figure((7, 4))
    draw_angular_distribution(fig, angles_deg)
    _save(fig, path)


def draw_angular_distribution(fig, angles_deg):
    """Projection directions (rot, tilt) of ``angles_deg`` (n, 3) as a 2D histogram on a Mollweide map."""
    rot = np.radians(((angles_deg[:, 0] + 180.0) % 360.0) - 180.0)
    tilt = np.radians(angles_deg[:, 1])
    latitude = np.pi / 2 - tilt
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


def convergence_plot(path, history):
    """Write the convergence plot (PNG) of :func:`draw_convergence`."""
    fig = _new_figure((6, 7))
    draw_convergence(fig, history)
    _save(fig, path)


def draw_convergence(fig, history):
    """Resolution (A), % of the search space visited and orientation change (deg) per iteration.

    ``history``: one dict per iteration with iteration, resolution_A, next_limit_A,
    fraction_visited (0-1) and orientation_change_deg.
    """
    it = [h["iteration"] for h in history]
    axes = fig.subplots(3, 1, sharex=True)
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


def postprocess_fsc_plot(path, curves, box, pixel_size_A, resolution_A):
    """Write the post-processing FSC plot (PNG) of :func:`draw_postprocess_fsc`."""
    fig = _new_figure((6, 4))
    draw_postprocess_fsc(fig, curves, box, pixel_size_A, resolution_A)
    _save(fig, path)


def draw_postprocess_fsc(fig, curves, box, pixel_size_A, resolution_A):
    """FSC curves (name -> (box//2+1,) per shell, the first drawn thick) against resolution (A), RELION's colours."""
    colours = ["black", "tab:green", "tab:blue", "tab:red"]
    ax = fig.add_subplot(111)
    for i, (name, curve) in enumerate(curves.items()):
        shells = np.arange(len(curve))
        ax.plot(shells[1:], np.asarray(curve)[1:], color=colours[i % len(colours)], lw=2.0 if i == 0 else 1.0,
                label=name)
    ax.axhline(0.143, color="grey", lw=0.8, ls="--")
    ax.axvline(box * pixel_size_A / resolution_A, color="grey", lw=0.8, ls=":")
    _fsc_axes(ax, len(next(iter(curves.values()))), box, pixel_size_A)
    ax.set_title(f"Final resolution (FSC = 0.143): {resolution_A:.2f} A")


def guinier_plot(path, guinier, fit, bfactor_A2):
    """Write the Guinier plot (PNG) of :func:`draw_guinier`."""
    fig = _new_figure((6, 4))
    draw_guinier(fig, guinier, fit, bfactor_A2)
    _save(fig, path)


def draw_guinier(fig, guinier, fit, bfactor_A2):
    """ln(amplitude) against 1/d^2 (1/A^2): the average map, FSC-weighted, sharpened, and the fitted line.

    ``guinier``: a ``postprocess.GuinierPlot``; ``fit``: a ``postprocess.BfactorFit`` or None.
    Points at -99 (empty shells) are left out.
    """
    ax = fig.add_subplot(111)
    x = guinier.resolution_squared
    for values, name, colour in ((guinier.original, "average map", "black"),
                                 (guinier.weighted, "FSC-weighted", "tab:blue"),
                                 (guinier.sharpened, f"sharpened (B = {bfactor_A2:.0f} A^2)", "tab:red")):
        shown = (values > -99) & (x > 0)
        ax.plot(x[shown], values[shown], color=colour, lw=1.0, label=name)
    if fit is not None:
        high = 1.0 / fit.highres_A ** 2 if fit.highres_A > 0 else x.max()  # highres 0: up to Nyquist
        span = np.array([1.0 / fit.lowres_A ** 2, high])
        ax.plot(span, fit.intercept + fit.slope * span, color="tab:orange", ls="--", lw=1.5,
                label=f"fit {fit.lowres_A:.1f}-{fit.highres_A:.1f} A: slope {fit.slope:.0f} A^2")
    ax.set_xlabel("1 / resolution^2 (1/A^2)")
    ax.set_ylabel("ln(amplitude)")
    ax.legend(fontsize=8)
    ax.set_title("Guinier plot")
