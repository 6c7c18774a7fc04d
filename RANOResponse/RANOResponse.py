"""RANOResponse: the clinical 3D Slicer module. Wiring only: what computes or touches the scene is in
RANOResponseLib (no Qt; tested on the MRML of ``slicer-core``): mrml/logic.py (``PanelLogic``, which this Logic
subclasses), mrml/runner.py + process.py (predict, timeline in a child process, polled here by a QTimer)."""

import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# light imports (standard library only): the module loads before the runtime's packages are installed
from RANOResponseLib.mrml.logic import MAP_CHOICES, PanelLogic  # noqa: E402
from RANOResponseLib.mrml.process import slicer_python  # noqa: E402


class RANOResponse(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "RANO Response"
        parent.categories = ["Quantification"]
        parent.dependencies = []
        parent.contributors = ["RANOResponse developers"]
        parent.helpText = ("Classifies glioblastoma response (CR/PR/SD/PD) between two studies (CT1, T1, T2, FLAIR) "
                           "with saliency and Grad-CAM maps, segments the tumour and measures RANO beside the "
                           "network, and follows a patient's course. Research use only, not for clinical use.")
        parent.acknowledgementText = "Method after Matoso et al. 2025 (DenseNet on paired MRI, LUMIERE)."


@parameterNodeWrapper
class RANOResponseParameterNode:
    """The module's state, saved with the scene (no ``from __future__ import annotations`` here: the
    wrapper reads these types)."""

    baselineFolder: Path
    followupFolder: Path
    baselineCT1: vtkMRMLScalarVolumeNode
    baselineT1: vtkMRMLScalarVolumeNode
    baselineT2: vtkMRMLScalarVolumeNode
    baselineFLAIR: vtkMRMLScalarVolumeNode
    followupCT1: vtkMRMLScalarVolumeNode
    followupT1: vtkMRMLScalarVolumeNode
    followupT2: vtkMRMLScalarVolumeNode
    followupFLAIR: vtkMRMLScalarVolumeNode
    bundle: Path
    roi: vtkMRMLMarkupsROINode
    segmentation: bool = True  # Apply also segments and measures the tumour (off: predict --no-segmentation)
    mapName: Annotated[str, Choice(list(MAP_CHOICES))] = "Grad-CAM"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    worklist: Path
    reviewDatabase: Path
    reviewer: str
    coursePatient: Path
    courseFolder: Path
    # results of the last Apply (not shown as inputs)
    transform: vtkMRMLLinearTransformNode
    gradcam: vtkMRMLScalarVolumeNode
    saliency: vtkMRMLScalarVolumeNode
    table: vtkMRMLTableNode


class RANOResponseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires RANOResponse.ui to RANOResponseLogic; computes nothing itself."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._running = ("applyButton", "Apply", None)  # the running job's button, its text, its finish
        self._timer = None

    # ------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RANOResponse.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RANOResponseLogic()
        self.logic.on_change = self._showResults  # a moved diameter line changed the measured class

        from RANOResponseLib.core.names import CLASS_NAMES
        from RANOResponseLib.model.device import gpu_choices

        for device, label in gpu_choices():
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.verdictComboBox.addItems(list(CLASS_NAMES))

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadStudiesButton.connect("clicked(bool)", self.onLoadStudies)
        self.ui.fitRoiButton.connect("clicked(bool)", self.onFitRoi)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.saveSceneButton.connect("clicked(bool)", lambda: self._saveAs(
            "Save results as a scene", "Slicer scene (*.mrml *.mrb)", self.logic.save_scene))
        self.ui.openWorklistButton.connect("clicked(bool)", self.onOpenWorklist)
        self.ui.previousCaseButton.connect("clicked(bool)", lambda: self.onStep("previous"))
        self.ui.nextCaseButton.connect("clicked(bool)", lambda: self.onStep("next"))
        self.ui.firstUnreviewedButton.connect("clicked(bool)", lambda: self.onStep("first_unreviewed"))
        self.ui.measureButton.connect("clicked(bool)", self.onMeasure)
        self.ui.agreeButton.connect("clicked(bool)", lambda: self.onSaveVerdict(agree=True))
        self.ui.saveVerdictButton.connect("clicked(bool)", lambda: self.onSaveVerdict(agree=False))
        self.ui.exportVerdictsButton.connect("clicked(bool)", lambda: self._saveAs(
            "Export verdicts as training labels", "CSV (*.csv)",
            lambda path: self.logic.export_verdicts(self._parameterNode.reviewDatabase, path)))
        self.ui.reportButton.connect("clicked(bool)", lambda: self._saveAs(
            "Case report", "PDF (*.pdf)", lambda path: self.logic.write_report(self._parameterNode, path)))
        self.ui.runCourseButton.connect("clicked(bool)", self.onRunCourse)
        self.ui.loadCourseButton.connect("clicked(bool)", self.onLoadCourse)
        self.ui.courseTableView.connect("selectionChanged()", self.onCourseRow)
        self.onDeviceChanged(self.ui.deviceComboBox.currentIndex)
        self.initializeParameterNode()

    def cleanup(self):
        self.onSceneStartClose(None, None)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self._cancelJob()
        self.logic.reset()
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

    # ------------------------------------------------------------ reactions
    def onParameterChanged(self, caller=None, event=None):
        p = self._parameterNode
        if not p:
            return
        if self._job is None:
            self.ui.applyButton.enabled, self.ui.applyButton.toolTip = self.logic.apply_readiness(p)
        self.logic.update_overlay(p)  # shows the map only when the map, its opacity or the result changed

    def onDeviceChanged(self, index):
        self.ui.deviceWarningLabel.text = self.logic.device_notice(self.ui.deviceComboBox.itemData(index))

    def onLoadStudies(self):
        if self.logic.ensurePackages():
            with slicer.util.tryWithErrorDisplay("Could not load the studies.", waitCursor=True):
                self._showBackground(self.logic.load_studies(self._parameterNode))

    def _showResults(self):
        self.ui.resultLabel.text = self.logic.result_text()  # "No prediction yet." once another case is loaded
        self.ui.measurementLabel.text = self.logic.measurement_text()

    def _showBackground(self, node):
        self._showResults()
        if node is not None:
            slicer.util.setSliceViewerLayers(background=node, fit=True)

    def onFitRoi(self):
        if self.logic.ensurePackages():
            with slicer.util.tryWithErrorDisplay("Could not fit the region.", waitCursor=True):
                self.logic.fit_roi(self._parameterNode)

    def onApply(self):
        self._start("applyButton", self.logic.start_prediction, self._finishPrediction)

    def onRunCourse(self):
        self._start("runCourseButton", self.logic.start_course, self._finishCourse)

    def _start(self, button, start, finish):
        if self._job is not None:  # the running job's button is Cancel
            self._cancelJob()
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            return
        if not self.logic.ensurePackages():
            return
        with slicer.util.tryWithErrorDisplay("Could not start.", waitCursor=True):
            # an explicit GPU that is absent raises DeviceError: shown, never a silent switch to the CPU
            self._job, notice = start(self._parameterNode, self.ui.deviceComboBox.currentData)
            self.ui.deviceWarningLabel.text = notice
            self._running = (button, getattr(self.ui, button).text, finish)
            self._setRunning(True)
            self._timer.start()

    def onPoll(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.run.poll():
            self.ui.progressBar.value = int(100 * event.frac)
            self.ui.statusLabel.text = event.text
        if job.run.running:
            return
        self._timer.stop()
        self._job = None
        finish = self._running[2]
        self._setRunning(False)
        with slicer.util.tryWithErrorDisplay("The run failed.", waitCursor=True):
            finish(job)

    def _finishPrediction(self, job):
        summary = self.logic.finish_prediction(self._parameterNode, job)
        self._showResults()
        self.ui.statusLabel.text = f"Done in {job.run.elapsed:.1f} s on {summary.get('device', '?')}."

    def _setRunning(self, running):
        button, text, _ = self._running
        getattr(self.ui, button).text = "Cancel" if running else text
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        for name in ("loadStudiesButton", "fitRoiButton", "inputsCollapsibleButton", "modelCollapsibleButton",
                     "reviewCollapsibleButton", "applyButton", "runCourseButton", "loadCourseButton"):
            getattr(self.ui, name).enabled = name == button or not running  # a case change mid-run mixes cases
        if not running:
            self.onParameterChanged()

    def _cancelJob(self):
        if self._timer:
            self._timer.stop()
        if self._job is not None:
            self.logic.cancel(self._job)
            self._job = None
            self._setRunning(False)

    def _saveAs(self, title, filters, save):
        path = qt.QFileDialog.getSaveFileName(None, title, "", filters)
        if path:
            with slicer.util.tryWithErrorDisplay(f"{title}: failed.", waitCursor=True):
                save(path)

    # ---------------------------------------------------------------- review
    def onOpenWorklist(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not open the worklist.", waitCursor=True):
            self.ui.caseLabel.text = self.logic.open_review(p.worklist, p.reviewDatabase, p.reviewer)
        self._showCase()

    def onStep(self, where):
        if self.logic.review is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not move in the worklist.", waitCursor=True):
            message = self.logic.step_review(where)
        if message:  # at an end of the worklist: stay on this case, and say so
            self.ui.caseLabel.text = f"{self.logic.case_text()}\n{message}"
        else:
            self._showCase()

    def _showCase(self):
        self.ui.caseLabel.text = self.logic.case_text()
        if self.logic.ensurePackages():
            with slicer.util.tryWithErrorDisplay("Could not open the case.", waitCursor=True):
                self._showBackground(self.logic.load_review_case(self._parameterNode))

    def onMeasure(self):  # without a worklist: "open a worklist first"
        with slicer.util.tryWithErrorDisplay("Could not measure the lesions.", waitCursor=True):
            self.logic.measure_case()
            self._showResults()

    def onSaveVerdict(self, agree):  # without a worklist: "open a worklist first"
        with slicer.util.tryWithErrorDisplay("Could not save the verdict.", waitCursor=True):
            self.ui.caseLabel.text = self.logic.save_verdict(
                agree=agree, label=self.ui.verdictComboBox.currentText,
                confidence=int(self.ui.confidenceSlider.value), note=self.ui.noteEdit.toPlainText())
            self.ui.noteEdit.setPlainText("")

    # ---------------------------------------------------------------- course
    def onLoadCourse(self):
        if self.logic.ensurePackages():
            with slicer.util.tryWithErrorDisplay("Could not load the course.", waitCursor=True):
                self._showCourse(self.logic.load_course(self._parameterNode.courseFolder))

    def _finishCourse(self, job):
        self._showCourse(self.logic.finish_course(job), f"Course done in {job.run.elapsed:.1f} s.")

    def _showCourse(self, table, status=""):
        self.ui.courseTableView.setMRMLTableNode(table)
        self.ui.courseLabel.text, self.ui.statusLabel.text = self.logic.course_text(), status

    def onCourseRow(self):
        view = self.ui.courseTableView
        row = view.sortFilterProxyModel().mapToSource(view.currentIndex()).row()  # the table's row, even sorted
        if row >= 0 and self.logic.course is not None:
            with slicer.util.tryWithErrorDisplay("Could not show the timepoint.", waitCursor=True):
                self.ui.courseLabel.text = self.logic.show_course_timepoint(row)


class RANOResponseLogic(ScriptedLoadableModuleLogic, PanelLogic):
    """RANOResponseLib's PanelLogic on ``slicer.mrmlScene``, plus what needs the Slicer application."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)  # (which may call PanelLogic.__init__ with no scene)
        PanelLogic.__init__(self, slicer.mrmlScene, python=slicer_python())

    def getParameterNode(self):
        return RANOResponseParameterNode(super().getParameterNode())

    @staticmethod
    def ensurePackages(dependencies=None) -> bool:
        """Check the runtime's packages against their ranges; after asking, install what is missing or
        incompatible (torch through the PyTorch extension, the rest with pip)."""
        from RANOResponseLib.mrml.dependencies import RUNTIME, ensure

        def installTorch():
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager first.")
                return False
            return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is not None

        return ensure(confirm=slicer.util.confirmOkCancelDisplay, pip_install=slicer.util.pip_install,
                      install_torch=installTorch, warn=slicer.util.warningDisplay,
                      dependencies=RUNTIME if dependencies is None else dependencies)


class RANOResponseTest(ScriptedLoadableModuleTest):
    """Runs the module logic in Slicer on the shipped sample case pair (nothing generated or downloaded); the
    checks are RANOResponseLib.mrml.module_checks, which pytest also runs on slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_sample_pair_end_to_end, self.test_cancel_leaves_scene_clean, self.test_sample_course):
            self.setUp()
            test()

    def _logic(self):
        self.assertTrue(RANOResponseLogic.ensurePackages(), "the runtime's Python packages are not usable")
        logic = RANOResponseLogic()
        return logic, logic.getParameterNode()

    def test_sample_pair_end_to_end(self):
        from RANOResponseLib.mrml.module_checks import check_sample_prediction

        self.delayDisplay("Predicting on the shipped sample pair")
        check_sample_prediction(*self._logic())
        self.delayDisplay("Test passed")

    def test_cancel_leaves_scene_clean(self):
        from RANOResponseLib.mrml.module_checks import check_cancel_leaves_scene_clean

        check_cancel_leaves_scene_clean(*self._logic())
        self.delayDisplay("Test passed")

    def test_sample_course(self):
        import tempfile

        from RANOResponseLib.mrml.module_checks import check_sample_course

        self.delayDisplay("The sample pair as a two-timepoint course")
        with tempfile.TemporaryDirectory(prefix="RANOResponse-course-") as folder:
            check_sample_course(*self._logic(), folder)
        self.delayDisplay("Test passed")
