"""Scipion viewers of the PRIME refinement: FSC, orientation distribution, convergence, map.

They draw with the engine's own plotting functions (prime_plugin.core.report) into
Scipion plotters, and open the map in Scipion's default volume viewer.
"""

import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer
from pwem.viewers import DataView, EmPlotter, FscViewer

from prime_plugin.core import report
from prime_plugin.core.star import read_particles, read_star_blocks
from prime_plugin.protocols import ProtPrimeRefine3D


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
