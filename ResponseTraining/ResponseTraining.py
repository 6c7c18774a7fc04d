"""ResponseTraining: train and evaluate response classifiers; also a headless entry point.

The same arguments work three ways:

    rano-response train --data DIR --out RUN [...]
    python ResponseTraining/ResponseTraining.py train --data DIR --out RUN [...]
    Slicer --no-main-window --python-script ResponseTraining/ResponseTraining.py -- train --data DIR --out RUN [...]

The training logic lives in ResponseTrainingLib (no Qt): the run itself in ``training``, the
widget's side of it (arguments, child process, reading a run folder) in ``runs``. Inside Slicer
this file is also the module: a thin widget (dataset, folds, architecture, modalities, output)
that starts the same command in a background process with progress and cancel, then shows the
per-fold metrics and plots and offers the exported bundle to the RANO Response module.
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
        from RANOResponseCLI import main as program

        return program(args)
    if args and args[0] == "train":
        args = args[1:]
    from ResponseTrainingLib.cli import main

    return main(args)


if __name__ == "__main__":  # run as a script: the CLI only, before anything below imports Slicer
    _code = run_cli(sys.argv[1:])
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        sys.modules["slicer"].app.exit(_code)
    sys.exit(_code)

# Loaded by Slicer as a module from here on. These imports follow the script entry on purpose: a
# plain `python ResponseTraining.py` has exited above and never needs Slicer.
from typing import Annotated  # noqa: E402

import slicer  # noqa: E402
import vtk  # noqa: E402
from RANOResponseLib.core.names import PAIRINGS  # noqa: E402
from ResponseTrainingLib.runs import RANGES, WIDGET_ARCHS, WIDGET_RESUME  # noqa: E402
from ResponseTrainingLib.training.config import default  # noqa: E402
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402


class ResponseTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "RANO Response Training"
        parent.categories = ["Quantification"]
        parent.dependencies = ["RANOResponse"]  # its logic takes the trained bundle (Use this bundle)
        parent.contributors = ["RANOResponse developers"]
        parent.helpText = ("Train RANO response classifiers on a LUMIERE-layout cohort with patient-grouped "
                           "cross-validation, and export the model bundle used by the RANO Response module. "
                           "Research use only.")
        parent.acknowledgementText = "Method after Matoso et al. 2025 (DenseNet on paired MRI, LUMIERE)."


@parameterNodeWrapper
class ResponseTrainingParameterNode:
    """Training settings; each maps to one flag of ``rano-response train``, with its default.

    (No ``from __future__ import annotations`` in this file: the wrapper reads these types.)"""

    dataFolder: Path
    outputFolder: Path
    architecture: Annotated[str, Choice(list(WIDGET_ARCHS))] = default("arch")
    modalities: str = ",".join(default("modalities"))
    pairing: Annotated[str, Choice(list(PAIRINGS))] = default("pairing")
    folds: Annotated[int, WithinRange(*RANGES["folds"])] = default("folds")
    loocv: bool = default("loocv")
    epochs: Annotated[int, WithinRange(*RANGES["epochs"])] = default("epochs")
    seed: Annotated[int, WithinRange(*RANGES["seed"])] = default("seed")
    resume: bool = WIDGET_RESUME


class ResponseTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires ResponseTraining.ui to ResponseTrainingLogic; computes nothing itself."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._runFolder = None  # the output folder of the running job (the parameter node may go with the scene)
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
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.plotComboBox.connect("currentIndexChanged(int)", self.onPlotChanged)
        self.ui.useBundleButton.connect("clicked(bool)", self.onUseBundle)
        self.ui.openFolderButton.connect("clicked(bool)", self.onOpenFolder)
        self.initializeParameterNode()

    def cleanup(self):
        """The module is closing (or reloading): stop the child, the timer and every connection."""
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self._timer is not None:
            self._timer.stop()
            self._timer.disconnect("timeout()", self.onPoll)
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # the GUI stops following the node while the module is hidden; a running job goes on
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, node):
        if self._parameterNode:
            if self._parameterNodeGuiTag:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = node
        if node:
            self._parameterNodeGuiTag = node.connectGui(self.ui)
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller=None, event=None):
        p = self._parameterNode
        if not p:
            return
        self.ui.foldsSpinBox.enabled = not p.loocv
        if self._run is None:
            self.ui.trainButton.enabled = self.logic.canTrain(p)

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
            self._runFolder = self._parameterNode.outputFolder
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
            self.showResults(self._runFolder)
        else:
            self._finish("Training failed: " + run.error_message())

    def _finish(self, text):
        self._timer.stop()
        self._run = None
        self.ui.trainButton.text = "Train"
        self.ui.trainButton.enabled = bool(self._parameterNode) and self.logic.canTrain(self._parameterNode)
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = text

    def showResults(self, out):
        import qt

        with slicer.util.tryWithErrorDisplay("Could not read the results.", waitCursor=True):
            header, rows = self.logic.metricsTable(out)
            table = self.ui.metricsTable
            table.setColumnCount(len(header))
            table.setRowCount(len(rows))
            table.setHorizontalHeaderLabels(header)
            for r, row in enumerate(rows):
                for c, value in enumerate(row):
                    table.setItem(r, c, qt.QTableWidgetItem(value))
            self._plots = self.logic.plots(out)
            self.ui.plotComboBox.clear()
            self.ui.plotComboBox.addItems([p.name for p in self._plots])
            self.ui.useBundleButton.enabled = self.logic.bundleFolder(out) is not None
            self.ui.openFolderButton.enabled = True

    def onPlotChanged(self, index):
        import qt

        if 0 <= index < len(self._plots):
            pixmap = qt.QPixmap(str(self._plots[index]))
            self.ui.plotLabel.setPixmap(pixmap.scaledToWidth(min(600, pixmap.width())))

    def onUseBundle(self):
        bundle = self.logic.bundleFolder(self._runFolder)
        with slicer.util.tryWithErrorDisplay("Could not use the bundle.", waitCursor=True):
            self.logic.useBundle(bundle)
            slicer.util.infoDisplay(f"RANO Response will use the bundle in\n{bundle}")

    def onOpenFolder(self):
        import qt

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._runFolder)))


class ResponseTrainingLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry points into ResponseTrainingLib.runs; all of them work without the widget."""

    def getParameterNode(self):
        return ResponseTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def ensurePackages(extra=()):
        """Ask, then install what training needs (``extra``: more dependencies, e.g. the phantom's):
        torch through the PyTorch extension, the rest with pip as version ranges."""
        from RANOResponseLib.mrml.dependencies import ensure
        from ResponseTrainingLib.dependencies import TRAINING

        return ensure(confirm=slicer.util.confirmOkCancelDisplay, pip_install=slicer.util.pip_install,
                      install_torch=_installTorch, warn=slicer.util.warningDisplay,
                      dependencies=TRAINING + tuple(extra))

    @staticmethod
    def canTrain(p):
        from ResponseTrainingLib.runs import is_set

        return is_set(p.dataFolder) and is_set(p.outputFolder)

    @staticmethod
    def trainArguments(p, device="auto"):
        from ResponseTrainingLib.runs import train_arguments

        return train_arguments(p.dataFolder, p.outputFolder, arch=p.architecture, modalities=p.modalities,
                               pairing=p.pairing, folds=p.folds, loocv=p.loocv, epochs=p.epochs, seed=p.seed,
                               resume=p.resume, device=device)

    @staticmethod
    def startTraining(args):
        from ResponseTrainingLib.runs import start_training

        return start_training(args)

    @staticmethod
    def metricsTable(out):
        from ResponseTrainingLib.runs import metrics_table

        return metrics_table(out)

    @staticmethod
    def plots(out):
        from ResponseTrainingLib.runs import run_plots

        return run_plots(out)

    @staticmethod
    def bundleFolder(out):
        from ResponseTrainingLib.runs import bundle_folder

        return bundle_folder(out)

    @staticmethod
    def useBundle(bundle):
        """Point the RANO Response module at ``bundle`` (checked first: sha256, inputs), through that
        module's logic, which Slicer loads first (``dependencies``)."""
        from RANOResponseLib.model.bundle import read_bundle

        read_bundle(bundle)
        slicer.util.getModuleLogic("RANOResponse").getParameterNode().bundle = Path(bundle)


def _installTorch():
    """torch through the PyTorch extension's PyTorchUtils (it picks the CUDA build for the driver)."""
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager first.")
        return False
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is not None


class ResponseTrainingTest(ScriptedLoadableModuleTest):
    """Trains 1 epoch on a 4-patient phantom through the same command the widget starts."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_train_tiny_phantom()

    def test_train_tiny_phantom(self):
        import tempfile

        from ResponseTrainingLib.dependencies import PHANTOM

        logic = ResponseTrainingLogic()
        self.assertTrue(logic.ensurePackages(extra=PHANTOM), "training or phantom packages missing")
        from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort

        root = Path(tempfile.mkdtemp(prefix="ResponseTrainingTest-"))
        generate_cohort(root / "data", PhantomConfig(patients=4, seed=3, spacing=4.0))
        p = logic.getParameterNode()
        p.dataFolder, p.outputFolder, p.epochs, p.folds = root / "data", root / "run", 1, 2
        run = logic.startTraining(logic.trainArguments(p, "cpu"))
        self.assertEqual(run.wait(), 0, run.error_message())
        header, rows = logic.metricsTable(p.outputFolder)
        self.assertIn("balanced_accuracy", header)
        self.assertEqual(logic.bundleFolder(p.outputFolder), root / "run" / "bundle")
        self.delayDisplay("Test passed")
