"""ProtPrimePostprocess: mask-corrected resolution, sharpening and local resolution of two half maps.

One step runs ``prime postprocess`` (prime_plugin.cli.postprocess) on the input volume's half maps
and the mask through Scipion's job mechanism; another registers what it wrote: the sharpened map
with the half maps, the four FSC curves of postprocess.star, and (when asked) the local-resolution
map. No numerics here.
"""

import os
import shlex

import pyworkflow.protocol.params as params
from pyworkflow.constants import PROD
from pwem.objects import FSC, SetOfFSCs, Volume
from pwem.protocols import ProtAnalysis3D

from prime_plugin import convert
from prime_plugin.core.star import read_star_blocks
from prime_plugin.protocols.engine_job import PrimeEngineJob

# postprocess.star's FSC columns, in the order the viewer draws them, with their labels.
FSC_COLUMNS = (("rlnFourierShellCorrelationCorrected", "corrected"),
               ("rlnFourierShellCorrelationUnmaskedMaps", "unmasked maps"),
               ("rlnFourierShellCorrelationMaskedMaps", "masked maps"),
               ("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", "phase-randomised masked maps"))


# Output names and classes. A dict, as pyworkflow asks when two outputs share a class: in an Enum the
# second Volume member would be an alias of the first (same value), and its name "outputVolume".
OUTPUT_VOLUME, OUTPUT_FSCS, OUTPUT_LOCAL_RESOLUTION = "outputVolume", "outputFSCs", "outputLocalResolution"
POSTPROCESS_OUTPUTS = {OUTPUT_VOLUME: Volume, OUTPUT_FSCS: SetOfFSCs, OUTPUT_LOCAL_RESOLUTION: Volume}


class ProtPrimePostprocess(PrimeEngineJob, ProtAnalysis3D):
    """Post-processing of a refinement's two half maps, as RELION's PostProcess: the FSC between the
    half maps with and without the solvent mask, corrected for the mask by phase randomisation; the
    final resolution (corrected FSC = 0.143); the average map weighted by the FSC, sharpened by a
    B-factor (fitted to the Guinier plot or given) and low-pass filtered at the resolution. Optionally
    local resolution (the FSC in soft spheres on a grid, as relion_postprocess --locres) and a map
    filtered to it. Outputs the sharpened map with the half maps, the FSC curves and the local-resolution map.
    """

    _label = "postprocess"
    _devStatus = PROD
    _possibleOutputs = POSTPROCESS_OUTPUTS
    _references = ["Chen2013", "Rosenthal2003"]
    OUTDIR = "postprocess"

    # -------------------------------------------------------------- form

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Volume with half maps",
                      help="A map with its two independent, unmasked half maps, e.g. the output of prime - 3D "
                           "refine or of a RELION refinement.")
        form.addParam("solventMask", params.PointerParam, pointerClass="VolumeMask", important=True,
                      label="Solvent mask",
                      help="Soft mask of the particle (values 0-1, 1 = particle) with the half maps' box, e.g. "
                           "from a mask protocol (prime mask does what relion_mask_create does).")
        form.addParam("bfactorMode", params.EnumParam, choices=["automatic (Guinier fit)", "ad hoc", "none"],
                      default=0, label="B-factor",
                      help="automatic: fitted to the Guinier plot of the FSC-weighted map between the low "
                           "resolution below and the final resolution (RELION's --auto_bfac). ad hoc: the value "
                           "below. none: no sharpening.")
        form.addParam("adhocBfactor", params.FloatParam, default=-100.0, condition="bfactorMode == 1",
                      label="Ad hoc B-factor (A^2)", help="Negative sharpens (RELION's --adhoc_bfac).")
        form.addParam("autobLowres", params.FloatParam, default=10.0, condition="bfactorMode == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Lowest resolution in the fit (A)",
                      help="The Guinier fit starts here (RELION's --autob_lowres).")
        form.addParam("autobHighres", params.FloatParam, default=-1.0, condition="bfactorMode == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Highest resolution in the fit (A)",
                      help="-1: the final resolution; 0: up to Nyquist (RELION 3.1's default).")
        form.addParam("lowPass", params.FloatParam, default=-1.0, expertLevel=params.LEVEL_ADVANCED,
                      label="Low-pass filter (A)", help="-1: at the final resolution; 0: no filter.")
        form.addParam("forceMask", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Always use the masked FSC?",
                      help="Keep the mask-corrected FSC even where the unmasked one reaches further (RELION's "
                           "--force_mask).")
        form.addParam("randomSeed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed", help="Seed of the random phases of the mask correction.")

        form.addSection(label="Local resolution")
        form.addParam("doLocalResolution", params.BooleanParam, default=False, label="Estimate local resolution?",
                      help="The FSC between the half maps in soft spheres centred on a grid, corrected for the "
                           "sphere by phase randomisation, as relion_postprocess --locres: a map of the local "
                           "resolution (A) and the map filtered to it.")
        form.addParam("locresSampling", params.FloatParam, default=25.0, condition="doLocalResolution",
                      label="Sampling (A)", help="Spacing of the grid of spheres in Angstrom (--locres_sampling).")
        form.addParam("locresMaskRadius", params.FloatParam, default=-1.0, condition="doLocalResolution",
                      expertLevel=params.LEVEL_ADVANCED, label="Sphere radius (A)",
                      help="-1: half the sampling (--locres_maskrad).")
        form.addParam("locresEdgeWidth", params.FloatParam, default=-1.0, condition="doLocalResolution",
                      expertLevel=params.LEVEL_ADVANCED, label="Sphere edge width (A)",
                      help="-1: the sampling (--locres_edgwidth).")
        form.addParam("locresRandomizeAt", params.FloatParam, default=25.0, condition="doLocalResolution",
                      expertLevel=params.LEVEL_ADVANCED, label="Randomise phases from (A)",
                      help="--locres_randomize_at.")
        form.addParam("locresMinres", params.FloatParam, default=50.0, condition="doLocalResolution",
                      expertLevel=params.LEVEL_ADVANCED, label="Lowest local resolution (A)",
                      help="--locres_minres.")
        form.addParallelSection(threads=1, mpi=0)

    # -------------------------------------------------------------- steps

    def _insertAllSteps(self):
        self._insertFunctionStep(self.postprocessStep, self._postprocessArguments(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def postprocessStep(self, arguments):
        self._runPrime(arguments)

    def createOutputStep(self):
        source = self.inputVolume.get()
        pixel_size = source.getSamplingRate()
        volume = Volume()
        volume.setFileName(self._outputFile("postprocess.mrc"))
        volume.setSamplingRate(pixel_size)
        volume.setHalfMaps(list(self._halfMaps()))

        table = read_star_blocks(self._outputFile("postprocess.star"))["fsc"]
        fscs = self._createSetOfFSCs()
        for column, label in FSC_COLUMNS:
            fsc = FSC(objLabel=label)
            fsc.setData(table["rlnResolution"].astype(float).tolist(), table[column].astype(float).tolist())
            fscs.append(fsc)
        outputs = {OUTPUT_VOLUME: volume, OUTPUT_FSCS: fscs}
        if self.doLocalResolution.get():
            local = Volume()
            local.setFileName(self._outputFile("postprocess_locres.mrc"))
            local.setSamplingRate(pixel_size)
            outputs[OUTPUT_LOCAL_RESOLUTION] = local
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputVolume, output)
            self._defineSourceRelation(self.solventMask, output)

    # -------------------------------------------------------------- helpers

    def _outputFile(self, name):
        return self._getExtraPath(self.OUTDIR, name)

    def _halfMaps(self):
        return tuple(convert.stack_path(name) for name in self.inputVolume.get().getHalfMaps(asList=True))

    def _postprocessArguments(self):
        quote = shlex.quote
        half1, half2 = self._halfMaps()
        arguments = [f"postprocess --i {quote(half1)} --i2 {quote(half2)}",
                     f"--mask {quote(convert.stack_path(self.solventMask.get().getFileName()))}",
                     f"--o {quote(self._getExtraPath(self.OUTDIR))}",
                     f"--angpix {self.inputVolume.get().getSamplingRate()}",
                     f"--random_seed {self.randomSeed.get()}"]
        mode = self.bfactorMode.get()
        if mode == 0:
            arguments.append(f"--auto_bfac --autob_lowres {self.autobLowres.get()}")
            if self.autobHighres.get() >= 0:
                arguments.append(f"--autob_highres {self.autobHighres.get()}")
        elif mode == 1:
            arguments.append(f"--adhoc_bfac {self.adhocBfactor.get()}")
        if self.lowPass.get() >= 0:
            arguments.append(f"--low_pass {self.lowPass.get()}")
        if self.forceMask.get():
            arguments.append("--force_mask")
        if self.doLocalResolution.get():
            arguments.append(f"--locres --locres_sampling {self.locresSampling.get()} "
                             f"--locres_randomize_at {self.locresRandomizeAt.get()} "
                             f"--locres_minres {self.locresMinres.get()}")
            if self.locresMaskRadius.get() > 0:
                arguments.append(f"--locres_maskrad {self.locresMaskRadius.get()}")
            if self.locresEdgeWidth.get() > 0:
                arguments.append(f"--locres_edgwidth {self.locresEdgeWidth.get()}")
        return " ".join(arguments)

    def _general(self):
        """postprocess.star's data_general as a dict, or None before the run has written it."""
        path = self._outputFile("postprocess.star")
        if not os.path.exists(path):
            return None
        return read_star_blocks(path)["general"]

    # -------------------------------------------------------------- info

    def _validate(self):
        volume, mask = self.inputVolume.get(), self.solventMask.get()
        if volume is None or mask is None:
            return ["A volume with half maps and a solvent mask are required."]
        errors = []
        if not volume.hasHalfMaps():
            errors.append("The input volume has no half maps: post-processing needs the two independent half "
                          "maps of a refinement.")
        elif len(volume.getHalfMaps(asList=True)) != 2:
            errors.append("The input volume must have exactly two half maps.")
        else:
            missing = [name for name in self._halfMaps() if not os.path.exists(name)]
            if missing:
                errors.append("Missing files: " + ", ".join(missing))
        if volume.getXDim() and mask.getXDim() and volume.getXDim() != mask.getXDim():
            errors.append(f"The mask is {mask.getXDim()} px wide but the volume {volume.getXDim()} px.")
        if self.doLocalResolution.get() and not self.locresSampling.get() > 0:
            errors.append("The local-resolution sampling must be positive.")
        return errors

    def _summary(self):
        general = self._general()
        if general is None:
            return ["Post-processing not finished yet."]
        lines = [f"Final resolution (corrected FSC = 0.143): {float(general['rlnFinalResolution']):.2f} A",
                 f"B-factor applied: {float(general['rlnBfactorUsedForSharpening']):.1f} A^2"]
        return lines

    def _methods(self):
        general = self._general()
        if general is None:
            return []
        return [f"The half maps of {self.getObjectTag('inputVolume')} were post-processed with PRIME as RELION "
                f"does: FSC corrected for the mask by phase randomisation (Chen et al. 2013), final resolution "
                f"{float(general['rlnFinalResolution']):.2f} A, sharpened with B = "
                f"{float(general['rlnBfactorUsedForSharpening']):.1f} A^2."]
