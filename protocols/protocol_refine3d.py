"""ProtPrimeRefine3D: gold-standard PRIME refinement of a SetOfParticles against a starting map.

Steps: write the particles as a RELION STAR file (prime_plugin.convert), run ``prime refine``
through Scipion's job mechanism (threads, queue), register the map with its half maps, the
FSC and the particles with their refined 3D alignment. No numerics here.
"""

import os
import shlex
from enum import Enum

import pyworkflow.protocol.params as params
from pyworkflow.constants import PROD
from pwem.objects import FSC, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D

from prime_plugin import convert
from prime_plugin.core import run_folder
from prime_plugin.core.star import read_star_blocks
from prime_plugin.core.symmetry import symmetry_operators
from prime_plugin.protocols.engine_job import PrimeEngineJob


class PrimeRefineOutputs(Enum):
    outputVolume = Volume
    outputFSC = FSC
    outputParticles = SetOfParticles


class ProtPrimeRefine3D(PrimeEngineJob, ProtRefine3D):
    """Refines particle orientations and origins and a 3D map by PRIME, the stochastic hill
    climbing projection matching of SIMPLE, with two independently refined half-sets
    (gold standard). Each iteration updates a random fraction of the particles (incremental
    learning), so a refinement takes a few minutes where a full expectation-maximisation
    takes hours. Outputs the FSC-weighted map with its two half maps, the FSC curve and the
    particles with their 3D alignment, correlation and orientation weight.
    """

    _label = "3D refine"
    _devStatus = PROD
    _possibleOutputs = PrimeRefineOutputs
    _references = ["Elmlund2013", "Reboul2016", "Reboul2018", "Reboul2018b"]
    OUTDIR = "refine"

    # -------------------------------------------------------------- form

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles to refine, from any protocol: extraction, a subset, an import... "
                           "Images must be MRC stacks (.mrcs/.mrc).")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Initial volume",
                      help="Starting map. It is low-passed to the initial resolution below, so a map from "
                           "another program or an earlier refinement is fine. It must have the particles' "
                           "box size and pixel size.")
        form.addParam("useInputAlignment", params.BooleanParam, default=False,
                      label="Start from the particles' 3D alignment?",
                      help="Yes: a local refinement. Every search stays near the particles' current "
                           "orientation and origin (from an earlier refinement or a classification): much "
                           "faster, and no particle jumps to an unrelated orientation (prime refine --local). "
                           "No: global searches over all orientations.")
        form.addParam("localSigmaAngle", params.FloatParam, default=3.0, condition="useInputAlignment",
                      label="Angular uncertainty (deg)",
                      help="The expected error of the input orientations in degrees (RELION's --sigma_ang): "
                           "the local search scores the orientations within three times this angle.")
        form.addParam("doCTF", params.BooleanParam, default=True, label="CTF correction?",
                      help="Correct for the contrast transfer function (Wiener restoration). Needs particles "
                           "with CTF estimates.")
        form.addParam("symmetryGroup", params.StringParam, default="C1", label="Symmetry",
                      help="Point group of the particle: C<n>, D<n>, T, O or I, RELION's convention "
                           "(C1: no symmetry).")
        form.addParam("particleDiameter", params.FloatParam, default=-1, label="Particle diameter (A)",
                      help="Diameter in Angstrom of a circle that holds the particle. -1: 90% of the box.")
        form.addParam("initialLowPass", params.FloatParam, default=40.0, label="Initial low-pass filter (A)",
                      help="Resolution in Angstrom to which the initial volume is low-passed before the first "
                           "iteration. 30-60 A for a map from another data set or an ab initio model.")

        form.addSection(label="Search")
        form.addParam("updateFraction", params.FloatParam, default=0.2, label="Update fraction",
                      help="Fraction of the particles searched in each iteration after the first, which "
                           "searches them all (incremental learning). 1.0 searches every particle every "
                           "iteration.")
        form.addParam("searchMode", params.EnumParam, choices=["greedy", "shc"], default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Search",
                      help="greedy: every search scores a coarse grid of directions (as fine as the current "
                           "resolution needs) at every origin offset, then climbs to the best neighbouring "
                           "direction. shc: stochastic hill climbing from the previous orientation, faster but "
                           "on real particles it leaves more of them in wrong orientations.")
        form.addParam("noiseModel", params.BooleanParam, default=True, expertLevel=params.LEVEL_ADVANCED,
                      label="Weigh by the noise spectrum?",
                      help="Yes: each Fourier ring of the correlation is weighted by the noise power of the "
                           "particle's micrograph, estimated from the data (what RELION's likelihood does). "
                           "No: the plain normalised correlation.")
        form.addParam("numberOfDirections", params.IntParam, default=4000, label="Number of projection directions",
                      help="Reference projection directions over the asymmetric unit. 4000 gives a step of "
                           "about 3.2 degrees in C1; the search time grows about in proportion.")
        form.addParam("maxIterations", params.IntParam, default=30, label="Maximum iterations",
                      help="The refinement stops earlier when the resolution and orientations have converged.")
        form.addParam("originRange", params.FloatParam, default=-1, expertLevel=params.LEVEL_ADVANCED,
                      label="Origin search range (px)",
                      help="Largest origin change in pixels searched in one iteration. -1: the program's "
                           "default for the box size.")
        form.addParam("numberOfPeaks", params.IntParam, default=3, expertLevel=params.LEVEL_ADVANCED,
                      label="Orientations kept per particle",
                      help="Best orientations of each particle kept with softmax weights in the reconstruction.")
        form.addParam("weightSoftness", params.FloatParam, default=0.02, expertLevel=params.LEVEL_ADVANCED,
                      label="Softness of the orientation weights",
                      help="Orientation j of a particle weighs exp(-(1 - correlation_j) / softness), normalised "
                           "over the kept orientations. Smaller values trust the best orientation more; 0.02 "
                           "suits typical data.")
        form.addParam("refineBetweenGridPoints", params.BooleanParam, default=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Refine orientations between grid points?",
                      help="Yes: each particle's best orientation is refined between the projection directions "
                           "and in-plane angles of the search grid by a quadratic fit of the correlation around "
                           "it (median angular error 1.5 instead of 2.0 degrees on the benchmark data with the "
                           "default directions, at almost no cost). No: orientations stay on the grid.")
        form.addParam("solventMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Solvent mask",
                      help="Soft mask of the particle (values 0-1), as RELION's --solvent_mask: it masks the "
                           "references and the FSC. Empty: a soft sphere of the particle diameter.")
        form.addParam("randomSeed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed", help="The same seed and input give the same result.")
        form.addParallelSection(threads=2, mpi=0)

    # -------------------------------------------------------------- steps

    def _insertAllSteps(self):
        particles_id = self.inputParticles.get().getObjId()
        volume_id = self.referenceVolume.get().getObjId()
        self._insertFunctionStep(self.convertInputStep, particles_id, volume_id, self.doCTF.get(),
                                 self.useInputAlignment.get(), needsGPU=False)
        self._insertFunctionStep(self.refineStep, self._refineArguments(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def convertInputStep(self, particles_id, volume_id, with_ctf, with_alignment):
        convert.particles_to_star(self.inputParticles.get(), self._particlesStar(), with_alignment=with_alignment,
                                  with_ctf=with_ctf)

    def refineStep(self, arguments):
        out = self._getExtraPath(self.OUTDIR)
        # A relaunch of an interrupted run continues from its last complete iteration (the engine says
        # whether there is one); otherwise the run starts anew.
        restart = "--continue" if run_folder.has_complete_iteration(out) else "--force"
        self._runPrime(f"{arguments} {restart}")

    def createOutputStep(self):
        particles = self.inputParticles.get()
        pixel_size = particles.getSamplingRate()

        volume = Volume()
        volume.setFileName(self._outputFile("run_class001.mrc"))
        volume.setSamplingRate(pixel_size)
        volume.setHalfMaps([self._outputFile("run_half1_class001_unfil.mrc"),
                            self._outputFile("run_half2_class001_unfil.mrc")])

        frequency, curve = convert.fsc_from_model_star(self._outputFile("run_model.star"))
        fsc = FSC(objLabel="PRIME gold-standard FSC")
        fsc.setData(frequency.tolist(), curve.tolist())

        refined = self._createSetOfParticles()
        refined.copyInfo(particles)
        refined.setAlignmentProj()
        refined.copyItems(particles, updateItemCallback=convert.RefinedParticleUpdater(self._outputFile("run_data.star")))

        self._defineOutputs(**{PrimeRefineOutputs.outputVolume.name: volume,
                               PrimeRefineOutputs.outputFSC.name: fsc,
                               PrimeRefineOutputs.outputParticles.name: refined})
        for output in (volume, fsc, refined):
            self._defineSourceRelation(self.inputParticles, output)
        self._defineSourceRelation(self.referenceVolume, volume)

    # -------------------------------------------------------------- helpers

    def _particlesStar(self):
        return self._getExtraPath("particles.star")

    def _outputFile(self, name):
        return self._getExtraPath(self.OUTDIR, name)

    def _refineArguments(self):
        quote = shlex.quote
        arguments = [f"refine --i {quote(self._particlesStar())}",
                     f"--ref {quote(convert.stack_path(self.referenceVolume.get().getFileName()))}",
                     f"--o {quote(self._getExtraPath(self.OUTDIR))}",
                     f"--sym {self.symmetryGroup.get()}", f"--ini_high {self.initialLowPass.get()}",
                     f"--update_frac {self.updateFraction.get()}", f"--nspace {self.numberOfDirections.get()}",
                     f"--max_iter {self.maxIterations.get()}", f"--npeaks {self.numberOfPeaks.get()}",
                     f"--sigma {self.weightSoftness.get()}",
                     f"--seed {self.randomSeed.get()}", f"--j {max(1, self.numberOfThreads.get())}"]
        if self.particleDiameter.get() > 0:
            arguments.append(f"--particle_diameter {self.particleDiameter.get()}")
        if self.originRange.get() > 0:
            arguments.append(f"--trs {self.originRange.get()}")
        if not self.refineBetweenGridPoints.get():
            arguments.append("--no_subgrid")
        arguments.append(f"--search {self.getEnumText('searchMode')}")
        if self.useInputAlignment.get():
            arguments.append(f"--local --sigma_ang {self.localSigmaAngle.get()}")
        if not self.noiseModel.get():
            arguments.append("--no_noise_model")
        if not self.doCTF.get():
            arguments.append("--no_ctf")
        if self.solventMask.get() is not None:
            arguments.append(f"--solvent_mask {quote(convert.stack_path(self.solventMask.get().getFileName()))}")
        return " ".join(arguments)

    # -------------------------------------------------------------- info

    def _validate(self):
        errors = []
        particles = self.inputParticles.get()
        volume = self.referenceVolume.get()
        if particles is None or volume is None:
            return ["Input particles and an initial volume are required."]
        if self.doCTF.get() and not particles.hasCTF():
            errors.append("CTF correction is on but the input particles have no CTF estimates: estimate "
                          "the CTF upstream or set 'CTF correction?' to No.")
        if self.useInputAlignment.get() and not particles.hasAlignmentProj():
            errors.append("'Start from the particles' 3D alignment?' is Yes but the particles have no 3D "
                          "(projection) alignment.")
        if self.useInputAlignment.get() and not self.localSigmaAngle.get() > 0:
            errors.append("The angular uncertainty of a local refinement must be positive.")
        box, volume_box = particles.getXDim(), volume.getXDim()
        if volume_box is not None and box is not None and volume_box != box:
            errors.append(f"The initial volume is {volume_box} px wide but the particles are {box} px: "
                          "resize the volume to the particles' box first.")
        apix, volume_apix = particles.getSamplingRate(), volume.getSamplingRate()
        if apix and volume_apix and abs(apix - volume_apix) > 1e-3 * apix:
            errors.append(f"The initial volume has {volume_apix:.4g} A/px but the particles {apix:.4g} A/px: "
                          "resample the volume first.")
        diameter = self.particleDiameter.get()
        if box and apix and diameter > box * apix:
            errors.append(f"The particle diameter ({diameter:g} A) is larger than the box ({box * apix:g} A).")
        fraction = self.updateFraction.get()
        if not 0 < fraction <= 1:
            errors.append("The update fraction must be in (0, 1].")
        if self.maxIterations.get() < 1:
            errors.append("At least one iteration is needed.")
        if not self.weightSoftness.get() > 0:
            errors.append("The softness of the orientation weights must be positive.")
        try:
            symmetry_operators(self.symmetryGroup.get())
        except Exception as error:  # the engine's own message names the problem
            errors.append(f"Symmetry '{self.symmetryGroup.get()}': {error}")
        if len(particles) < 4:
            errors.append(f"{len(particles)} particles: two half-sets need at least 4.")
        missing = convert.missing_stacks(particles) + ([] if os.path.exists(convert.stack_path(volume.getFileName()))
                                                       else [volume.getFileName()])
        if missing:
            errors.append("Missing files: " + ", ".join(missing))
        unreadable = convert.non_mrc_stacks(particles)
        if unreadable:
            errors.append("PRIME reads MRC stacks only; convert these first: " + ", ".join(unreadable))
        return errors

    def _summary(self):
        if not self.hasAttribute(PrimeRefineOutputs.outputVolume.name):
            return ["Refinement not finished yet."]
        resolution = self._finalResolution()
        lines = [f"Gold-standard resolution (FSC 0.143): {resolution:.2f} A" if resolution else "",
                 f"Symmetry {self.symmetryGroup.get()}, update fraction {self.updateFraction.get():g}, "
                 f"{self.numberOfDirections.get()} directions."]
        return [line for line in lines if line]

    def _methods(self):
        if not self.hasAttribute(PrimeRefineOutputs.outputVolume.name):
            return []
        particles = self.inputParticles.get()
        resolution = self._finalResolution()
        text = (f"{len(particles)} particles were refined with PRIME [Elmlund2013; Reboul2016; Reboul2018] "
                f"(stochastic hill climbing, update fraction {self.updateFraction.get():g}, symmetry "
                f"{self.symmetryGroup.get()}) against {self.getObjectTag('referenceVolume')} low-passed to "
                f"{self.initialLowPass.get():g} A, with independently refined half-sets")
        if resolution:
            text += f"; the gold-standard FSC at 0.143 gave {resolution:.2f} A"
        return [text + "."]

    def _finalResolution(self):
        """Final gold-standard resolution (A) from run_model.star, or None."""
        model = self._outputFile("run_model.star")
        if not os.path.exists(model):
            return None
        value = read_star_blocks(model)["model_general"].get("rlnCurrentResolution")
        return 1.0 / float(value) if value else None
