"""RANOResponse: the clinical 3D Slicer module.

Thin on purpose: the work is done by RANOResponseLib (no Qt), which the CLI and the training
module share. This first version picks two study folders and runs the core on them in a
background process, then loads the maps over the baseline. The full module (scene logic with
transform/ROI/table nodes, parameter node, device choice, progress and cancel) is tracked in
the issue "The Slicer modules".
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

sys.path.insert(0, os.path.dirname(__file__))


class RANOResponse(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "RANO Response"
        parent.categories = ["Quantification"]
        parent.contributors = ["RANOResponse developers"]
        parent.helpText = (
            "Classifies glioblastoma response (CR/PR/SD/PD) between a baseline and a follow-up study "
            "(CT1, T1, T2, FLAIR) and overlays saliency and Grad-CAM maps. Research use only."
        )
        parent.acknowledgementText = "Method after Matoso et al. 2025 (DenseNet on paired MRI, LUMIERE)."


class RANOResponseWidget(ScriptedLoadableModuleWidget):
    """Two folder pickers, a device choice and Apply; everything else is the logic's."""

    def setup(self):
        import ctk
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.baselineDir = ctk.ctkPathLineEdit()
        self.baselineDir.filters = ctk.ctkPathLineEdit.Dirs
        self.followupDir = ctk.ctkPathLineEdit()
        self.followupDir.filters = ctk.ctkPathLineEdit.Dirs
        self.device = qt.QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.applyButton = qt.QPushButton("Apply")
        self.progress = qt.QProgressBar()
        self.result = qt.QLabel("")
        form.addRow("Baseline study:", self.baselineDir)
        form.addRow("Follow-up study:", self.followupDir)
        form.addRow("Device:", self.device)
        form.addRow(self.applyButton)
        form.addRow(self.progress)
        form.addRow(self.result)
        self.layout.addStretch(1)
        self.logic = RANOResponseLogic()
        self.applyButton.connect("clicked(bool)", self.onApply)

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("RANO response prediction failed.", waitCursor=True):
            self.progress.setValue(10)
            summary = self.logic.run(self.baselineDir.currentPath, self.followupDir.currentPath,
                                     self.device.currentText)
            self.progress.setValue(100)
            probs = "  ".join(f"{k} {v:.2f}" for k, v in summary["probabilities"].items())
            self.result.setText(f"<b>{summary['label']}</b>   {probs}")


class RANOResponseLogic(ScriptedLoadableModuleLogic):
    """Runs ``rano-response predict`` in a separate Python process and loads its outputs."""

    def run(self, baseline: str, followup: str, device: str = "auto") -> dict:
        out = tempfile.mkdtemp(prefix="RANOResponse-")
        script = (
            "import sys; sys.path.insert(0, %r); from RANOResponseLib.cli import main; sys.exit(main())"
            % os.path.dirname(__file__)
        )
        args = [script, "predict", "--baseline", baseline, "--followup", followup,
                "--out", os.path.join(out, "result"), "--device", device, "--quiet"]
        proc = slicer.util.launchConsoleProcess([sys.executable, "-c", *args])
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(stdout.strip().splitlines()[-1] if stdout.strip() else "predict failed")
        result = os.path.join(out, "result")
        with open(os.path.join(result, "prediction.json")) as fh:
            summary = json.load(fh)
        base = slicer.util.loadVolume(summary["inputs"]["baseline"].get("CT1") or
                                      next(iter(summary["inputs"]["baseline"].values())))
        gradcam = slicer.util.loadVolume(os.path.join(result, "gradcam.nii.gz"))
        slicer.util.setSliceViewerLayers(background=base, foreground=gradcam, foregroundOpacity=0.4)
        return summary


class RANOResponseTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_phantom_pair()

    def test_phantom_pair(self):
        from pathlib import Path

        from RANOResponseLib.demo import demo_case

        root = Path(tempfile.mkdtemp(prefix="RANOResponseTest-"))
        baseline, followup, _ = demo_case(root / "phantom", spacing=3.0)
        summary = RANOResponseLogic().run(str(baseline), str(followup), "cpu")
        self.assertAlmostEqual(sum(summary["probabilities"].values()), 1.0, places=4)
        self.assertIn(summary["label"], summary["probabilities"])
