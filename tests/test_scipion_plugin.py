"""Scipion finds the plugin the way it finds any plugin: entry point, protocols, viewers,
citations and templates, in a fresh interpreter (the installed package, editable or not).
Skips without Scipion (fails with PRIME_REQUIRE_SCIPION=1)."""

import json
import subprocess
import sys

DISCOVERY = r"""
import json
from pyworkflow import Config
import pyworkflow.utils as pwutils
domain = Config.getDomain()
plugins = domain.getPlugins()
module = plugins["prime_plugin"]
protocols = domain.getProtocols()
viewers = domain.getViewers()
import prime_plugin.bibtex
print(json.dumps({
    "plugin_class": type(module._pluginInstance).__module__ + "." + type(module._pluginInstance).__name__,
    "protocol_module": protocols["ProtPrimeRefine3D"].__module__,
    "label": protocols["ProtPrimeRefine3D"].getClassLabel(),
    "viewer": "PrimeRefine3DViewer" in viewers,
    "postprocess": [protocols["ProtPrimePostprocess"].__module__, protocols["ProtPrimePostprocess"].getClassLabel(),
                    "PrimePostprocessViewer" in viewers, protocols["ProtPrimePostprocess"]._references],
    "templates": [t.name for t in module._pluginInstance.getTemplates()],
    "citations": sorted(pwutils.parseBibTex(prime_plugin.bibtex.__doc__)),
    "references": protocols["ProtPrimeRefine3D"]._references,
}))
"""


def test_scipion_discovers_plugin_protocol_viewer_and_template(scipion, tmp_path):
    # Outside the repository, whose prime_plugin/ folder would shadow the installed package.
    done = subprocess.run([sys.executable, "-c", DISCOVERY], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["plugin_class"] == "prime_plugin.Plugin"
    assert found["protocol_module"] == "prime_plugin.protocols.protocol_refine3d"
    assert found["label"] == "prime - 3D refine"
    assert found["viewer"]
    module, label, viewer, references = found["postprocess"]
    assert (module, label, viewer) == ("prime_plugin.protocols.protocol_postprocess", "prime - postprocess", True)
    assert set(references) <= set(found["citations"])
    assert found["templates"] == ["prime_refine"]
    assert set(found["references"]) <= set(found["citations"])
    assert {"Elmlund2013", "Reboul2016", "Reboul2018"} <= set(found["citations"])
