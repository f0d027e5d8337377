"""Scipion viewers of the PRIME protocols.

Refinement: FSC, orientation distribution, convergence, map. Post-processing: the four FSC
curves (Scipion's FscViewer), the Guinier plot, the sharpened map and the local resolution.
They draw with the engine's own plotting functions (prime_plugin.core.report) or Scipion's
plotters, and open maps in Scipion's default volume viewer.
"""

import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer
from pwem.viewers import DataView, EmPlotter, FscViewer

from prime_plugin.convert import stack_path as convert_path
from prime_plugin.core import report
from prime_plugin.core.star import read_particles, read_star_blocks
from prime_plugin.protocols import ProtPrimePostprocess, ProtPrimeRefine3D


class PrimeRefine3DViewer(ProtocolViewer):
    """Results of a PRIME 3D refinement."""

    _label = "viewer PRIME 3D refine"
    _targets = [ProtPrimeRefine3D]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Results")
        form.addParam("showFsc", params.LabelParam, label="Gold-standard FSC",
                      help="FSC between the two independently refined half maps (0.143 criterion).")
        form.addParam("showAngularDistribution", params.LabelParam, label="Orientation distribution",
                      help="Projection directions of the refined particles.")
        form.addParam("showConvergence", params.LabelParam, label="Convergence",
                      help="Resolution, search space visited and orientation change per iteration.")
        form.addParam("showVolume", params.LabelParam, label="Map",
                      help="The final FSC-weighted map in Scipion's volume viewer.")

    def _getVisualizeDict(self):
        return {"showFsc": self._showFsc, "showAngularDistribution": self._showAngularDistribution,
                "showConvergence": self._showConvergence, "showVolume": self._showVolume}

    def _outputFile(self, name):
        return self.protocol._getExtraPath(self.protocol.OUTDIR, name)

    def _missing(self, name):
        path = self._outputFile(name)
        if os.path.exists(path):
            return None
        return [self.errorMessage(f"{path} does not exist yet: the refinement has not finished.",
                                  title="Missing result")]

    def _showFsc(self, param=None):
        if not hasattr(self.protocol, "outputFSC"):
            return [self.errorMessage("The refinement has no FSC output yet.", title="Missing result")]
        viewer = FscViewer(project=self.getProject(), protocol=self.protocol, figure=None)
        viewer.visualize(self.protocol.outputFSC)
        return [viewer.plotter]

    def _showAngularDistribution(self, param=None):
        missing = self._missing("run_data.star")
        if missing:
            return missing
        table = read_particles(self._outputFile("run_data.star")).particles
        angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
        plotter = EmPlotter(windowTitle="PRIME orientation distribution", figsize=(8, 4.5))
        figure = plotter.getFigure()
        figure.clf()
        report.draw_angular_distribution(figure, angles)
        return [plotter]

    def _showConvergence(self, param=None):
        missing = self._missing("run_convergence.star")
        if missing:
            return missing
        history = read_star_blocks(self._outputFile("run_convergence.star"))["convergence"]
        plotter = EmPlotter(windowTitle="PRIME convergence", figsize=(6, 7))
        figure = plotter.getFigure()
        figure.clf()
        report.draw_convergence(figure, history.to_dict("records"))
        return [plotter]

    def _showVolume(self, param=None):
        if not hasattr(self.protocol, "outputVolume"):
            return [self.errorMessage("The refinement has no map output yet.", title="Missing result")]
        return [DataView(self.protocol.outputVolume.getFileName())]


class PrimePostprocessViewer(ProtocolViewer):
    """Results of a PRIME post-processing."""

    _label = "viewer PRIME postprocess"
    _targets = [ProtPrimePostprocess]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Results")
        form.addParam("showFscs", params.LabelParam, label="FSC curves",
                      help="Corrected, unmasked, masked and phase-randomised masked FSC (0.143 criterion).")
        form.addParam("showGuinier", params.LabelParam, label="Guinier plot",
                      help="ln of the shell-averaged amplitude against 1/resolution^2: the average map, after FSC "
                           "weighting and after sharpening.")
        form.addParam("showVolume", params.LabelParam, label="Sharpened map", help="postprocess.mrc.")
        form.addParam("showLocalResolution", params.LabelParam, label="Local resolution",
                      help="Histogram of the local resolution inside the mask, and the map of it (A).")

    def _getVisualizeDict(self):
        return {"showFscs": self._showFscs, "showGuinier": self._showGuinier, "showVolume": self._showVolume,
                "showLocalResolution": self._showLocalResolution}

    def _absent(self, name, what):
        if hasattr(self.protocol, name):
            return None
        return [self.errorMessage(f"The post-processing has no {what} output.", title="Missing result")]

    def _showFscs(self, param=None):
        absent = self._absent("outputFSCs", "FSC")
        if absent:
            return absent
        viewer = FscViewer(project=self.getProject(), protocol=self.protocol, figure=None)
        viewer.visualize(self.protocol.outputFSCs)
        return [viewer.plotter]

    def _showGuinier(self, param=None):
        path = self.protocol._getExtraPath(self.protocol.OUTDIR, "postprocess.star")
        if not os.path.exists(path):
            return [self.errorMessage(f"{path} does not exist yet.", title="Missing result")]
        table = read_star_blocks(path)["guinier"]
        plotter = EmPlotter(windowTitle="PRIME Guinier plot", figsize=(6, 4))
        axes = plotter.createSubPlot("Guinier plot", "1 / resolution^2 (1/A^2)", "ln(amplitude)")
        x = table["rlnResolutionSquared"].to_numpy(float)
        for column, name in (("rlnLogAmplitudesOriginal", "average map"), ("rlnLogAmplitudesWeighted", "FSC-weighted"),
                             ("rlnLogAmplitudesSharpened", "sharpened")):
            if column in table:
                y = table[column].to_numpy(float)
                shown = (y > -99) & (x > 0)
                axes.plot(x[shown], y[shown], label=name)
        axes.legend()
        return [plotter]

    def _showVolume(self, param=None):
        absent = self._absent("outputVolume", "map")
        return absent or [DataView(self.protocol.outputVolume.getFileName())]

    def _showLocalResolution(self, param=None):
        absent = self._absent("outputLocalResolution", "local-resolution")
        if absent:
            return absent
        from prime_plugin.core.mrc import read_volume

        local, _ = read_volume(convert_path(self.protocol.outputLocalResolution.getFileName()))
        mask, _ = read_volume(convert_path(self.protocol.solventMask.get().getFileName()))
        plotter = EmPlotter(windowTitle="PRIME local resolution", figsize=(6, 4))
        axes = plotter.createSubPlot("Local resolution inside the mask (> 0.5)", "resolution (A)", "voxels")
        axes.hist(local[mask > 0.5], bins=30, color="tab:blue")
        return [plotter, DataView(self.protocol.outputLocalResolution.getFileName())]
