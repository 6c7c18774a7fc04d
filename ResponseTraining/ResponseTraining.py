"""ResponseTraining: train and evaluate response classifiers; also a headless entry point.

The same arguments work three ways:

    rano-response train --data DIR --out RUN [...]
    python ResponseTraining/ResponseTraining.py train --data DIR --out RUN [...]
    Slicer --no-main-window --python-script ResponseTraining/ResponseTraining.py -- train --data DIR --out RUN [...]

The training logic lives in ResponseTrainingLib (no Qt). Inside Slicer this file is also the
module: a thin widget (dataset, folds, architecture, modalities, output) that starts the same
command in a background process with progress and cancel, then shows the per-fold metrics and
plots and offers the exported bundle to the RANO Response module.
"""

import os
import sys
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.join(os.path.dirname(_HERE), "RANOResponse")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def run_cli(argv: list[str]) -> int:
    """Entry point shared by plain Python and ``Slicer --python-script`` (whose arguments follow
    ``--``): ``[--] [train] ARGS`` trains (``rano-response train ARGS``), ``[--] evaluate ARGS``
    scores a bundle (``rano-response evaluate ARGS``). No GUI is needed."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "evaluate":
        from RANOResponseLib.cli import main as core_main

        return core_main(args)
    if args and args[0] == "train":
        args = args[1:]
    from ResponseTrainingLib.cli import main

    return main(args)


try:  # inside Slicer: the module, its parameter node and its thin widget
    from typing import Annotated

    import slicer
    import vtk
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    class ResponseTraining(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            parent.title = "RANO Response Training"
            parent.categories = ["Quantification"]
            parent.dependencies = []
            parent.contributors = ["RANOResponse developers"]
            parent.helpText = ("Train RANO response classifiers on a LUMIERE-layout cohort with patient-grouped "
                               "cross-validation, and export the model bundle used by the RANO Response module. "
                               "Research use only.")
            parent.acknowledgementText = "Method after Matoso et al. 2025 (DenseNet on paired MRI, LUMIERE)."

    @parameterNodeWrapper
    class ResponseTrainingParameterNode:
        """Training settings; each maps to one flag of ``rano-response train``."""

        dataFolder: Path
        outputFolder: Path
        architecture: Annotated[str, Choice(["compact", "densenet121", "densenet169", "densenet264"])] = "compact"
        modalities: str = "T1,T2,FLAIR"
        pairing: Annotated[str, Choice(["previous", "reference"])] = "previous"
        folds: int = 5
        loocv: bool = False
        epochs: int = 100
        seed: int = 0
        resume: bool = True

    class ResponseTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
        """Wires ResponseTraining.ui to ResponseTrainingLogic; computes nothing itself."""

        def __init__(self, parent=None):
            ScriptedLoadableModuleWidget.__init__(self, parent)
            VTKObservationMixin.__init__(self)
            self.logic = None
            self._parameterNode = None
            self._parameterNodeGuiTag = None
            self._run = None
            self._timer = None
            self._plots = []

        def setup(self):
            import qt

            ScriptedLoadableModuleWidget.setup(self)
            uiWidget = slicer.util.loadUI(self.resourcePath("UI/ResponseTraining.ui"))
            self.layout.addWidget(uiWidget)
            self.ui = slicer.util.childWidgetVariables(uiWidget)
            uiWidget.setMRMLScene(slicer.mrmlScene)
            self.logic = ResponseTrainingLogic()
            from RANOResponseLib.model.device import gpu_choices

            for device, label in gpu_choices():
                self.ui.deviceComboBox.addItem(label, device)
            self._timer = qt.QTimer()
            self._timer.setInterval(500)
            self._timer.connect("timeout()", self.onPoll)
            self.ui.trainButton.connect("clicked(bool)", self.onTrain)
            self.ui.plotComboBox.connect("currentIndexChanged(int)", self.onPlotChanged)
            self.ui.useBundleButton.connect("clicked(bool)", self.onUseBundle)
            self.ui.openFolderButton.connect("clicked(bool)", self.onOpenFolder)
            self.setParameterNode(self.logic.getParameterNode())

        def cleanup(self):
            if self._run is not None:
                self._run.cancel()
            if self._timer:
                self._timer.stop()
            self.removeObservers()

        def setParameterNode(self, node):
            if self._parameterNode:
                if self._parameterNodeGuiTag:
                    self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self._parameterNode = node
            if node:
                self._parameterNodeGuiTag = node.connectGui(self.ui)
                self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
                self.onParameterChanged()

        def onParameterChanged(self, caller=None, event=None):
            p = self._parameterNode
            self.ui.foldsSpinBox.enabled = not p.loocv
            if self._run is None:
                self.ui.trainButton.enabled = bool(str(p.dataFolder) not in ("", ".") and
                                                   str(p.outputFolder) not in ("", "."))

        def onTrain(self):
            if self._run is not None:  # Train is Cancel while running; --resume picks it up later
                self._run.cancel()
                self._finish("Cancelled. Train again with 'Resume' checked to continue from the last epoch.")
                return
            if not self.logic.ensurePackages():
                return
            with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
                args = self.logic.trainArguments(self._parameterNode, self.ui.deviceComboBox.currentData)
                self.ui.commandLabel.text = "Same run headless:  rano-response train " + " ".join(args)
                self._run = self.logic.startTraining(args)
                self.ui.trainButton.text = "Cancel"
                self.ui.progressBar.visible = True
                self.ui.progressBar.value = 0
                self._timer.start()

        def onPoll(self):
            run = self._run
            if run is None:
                return
            for event in run.poll():
                self.ui.progressBar.value = int(100 * event.frac)
                self.ui.statusLabel.text = event.text
            if run.running:
                return
            if run.returncode == 0:
                self._finish("Finished.")
                self.showResults()
            else:
                self._finish("Training failed: " + run.error_message())

        def _finish(self, text):
            self._timer.stop()
            self._run = None
            self.ui.trainButton.text = "Train"
            self.ui.progressBar.visible = False
            self.ui.statusLabel.text = text

        def showResults(self):
            import qt

            header, rows = self.logic.metricsTable(self._parameterNode.outputFolder)
            table = self.ui.metricsTable
            table.setColumnCount(len(header))
            table.setRowCount(len(rows))
            table.setHorizontalHeaderLabels(header)
            for r, row in enumerate(rows):
                for c, value in enumerate(row):
                    table.setItem(r, c, qt.QTableWidgetItem(value))
            self._plots = self.logic.plots(self._parameterNode.outputFolder)
            self.ui.plotComboBox.clear()
            self.ui.plotComboBox.addItems([p.name for p in self._plots])
            bundle = self.logic.bundleFolder(self._parameterNode.outputFolder)
            self.ui.useBundleButton.enabled = bundle is not None
            self.ui.openFolderButton.enabled = True

        def onPlotChanged(self, index):
            import qt

            if 0 <= index < len(self._plots):
                pixmap = qt.QPixmap(str(self._plots[index]))
                self.ui.plotLabel.setPixmap(pixmap.scaledToWidth(min(600, pixmap.width())))

        def onUseBundle(self):
            bundle = self.logic.bundleFolder(self._parameterNode.outputFolder)
            with slicer.util.tryWithErrorDisplay("Could not use the bundle.", waitCursor=True):
                self.logic.useBundle(bundle)
                slicer.util.infoDisplay(f"RANO Response will use the bundle in\n{bundle}")

        def onOpenFolder(self):
            import qt

            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._parameterNode.outputFolder)))

    class ResponseTrainingLogic(ScriptedLoadableModuleLogic):
        """Slicer-side entry points into ResponseTrainingLib; all of them work without the widget."""

        def getParameterNode(self):
            return ResponseTrainingParameterNode(super().getParameterNode())

        @staticmethod
        def ensurePackages():
            """The same install-after-asking as the RANO Response module (torch, then pip packages)."""
            import RANOResponse

            return RANOResponse.RANOResponseLogic.ensurePackages()

        @staticmethod
        def trainArguments(p, device="auto"):
            args = ["--data", str(p.dataFolder), "--out", str(p.outputFolder), "--arch", p.architecture,
                    "--modalities", p.modalities, "--pairing", p.pairing, "--epochs", str(p.epochs),
                    "--seed", str(p.seed), "--device", device or "auto"]
            args += ["--loocv"] if p.loocv else ["--folds", str(p.folds)]
            if p.resume:
                args.append("--resume")
            return args

        @staticmethod
        def startTraining(args):
            from RANOResponseLib.mrml.process import BackgroundRun, core_command, slicer_python

            # no cleanup on cancel: the checkpoints are what --resume continues from
            return BackgroundRun(core_command(slicer_python(), "train", *args, "--progress-json"))

        @staticmethod
        def metricsTable(out):
            import csv

            with open(Path(out) / "metrics.csv", newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            return rows[0], rows[1:]

        @staticmethod
        def plots(out):
            return sorted(Path(out).rglob("*.png"))

        @staticmethod
        def bundleFolder(out):
            found = sorted(Path(out).rglob("bundle.json"))
            return found[0].parent if found else None

        @staticmethod
        def useBundle(bundle):
            """Point the RANO Response module at ``bundle`` (checked first: sha256, inputs)."""
            from RANOResponseLib.model.bundle import read_bundle

            read_bundle(bundle)
            import RANOResponse

            RANOResponse.RANOResponseLogic().getParameterNode().bundle = Path(bundle)

    class ResponseTrainingTest(ScriptedLoadableModuleTest):
        """Trains 1 epoch on a 3-patient phantom through the same command the widget starts."""

        def runTest(self):
            slicer.mrmlScene.Clear()
            self.test_train_tiny_phantom()

        def test_train_tiny_phantom(self):
            import tempfile

            from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort

            root = Path(tempfile.mkdtemp(prefix="ResponseTrainingTest-"))
            generate_cohort(root / "data", PhantomConfig(patients=4, seed=3, spacing=4.0))
            logic = ResponseTrainingLogic()
            p = logic.getParameterNode()
            p.dataFolder, p.outputFolder, p.epochs, p.folds = root / "data", root / "run", 1, 2
            run = logic.startTraining(logic.trainArguments(p, "cpu"))
            self.assertEqual(run.wait(), 0, run.error_message())
            header, rows = logic.metricsTable(p.outputFolder)
            self.assertIn("balanced_accuracy", header)
            self.assertIsNotNone(logic.bundleFolder(p.outputFolder))
            self.delayDisplay("Test passed")

except ImportError:  # plain Python or Slicer --python-script without the GUI parts: the CLI still works
    pass


if __name__ == "__main__":
    code = run_cli(sys.argv[1:])
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        sys.modules["slicer"].app.exit(code)
    sys.exit(code)
