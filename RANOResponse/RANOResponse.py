"""RANOResponse: the clinical 3D Slicer module.

Thin on purpose. Everything that computes or touches the scene lives in RANOResponseLib (no Qt,
tested in pytest on the real MRML of the ``slicer-core`` wheel); this file wires the UI to it:

* scene.py     load studies into volume nodes, transform / ROI / map / table nodes, overlays
* runner.py    Apply: ``rano-response predict`` in a child process, then its outputs into the scene
* process.py   the child process (progress, cancel) and the device choice with CPU fallback
* review.py, measurement*.py, rano_rules.py, report.py   the review panel
"""

import os
import sys
from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer import (
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.join(os.path.dirname(_HERE), "ResponseTraining")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MODALITIES = ("CT1", "T1", "T2", "FLAIR")
MAP_NAMES = ("Grad-CAM", "Saliency")


class RANOResponse(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "RANO Response"
        parent.categories = ["Quantification"]
        parent.dependencies = []
        parent.contributors = ["RANOResponse developers"]
        parent.helpText = (
            "Classifies glioblastoma response (CR/PR/SD/PD) between a baseline and a follow-up study "
            "(CT1, T1, T2, FLAIR) and overlays saliency and Grad-CAM maps. Research use only, not for "
            "clinical use."
        )
        parent.acknowledgementText = "Method after Matoso et al. 2025 (DenseNet on paired MRI, LUMIERE)."


@parameterNodeWrapper
class RANOResponseParameterNode:
    """The module's state; saved with the scene, so a reopened scene shows the same inputs.

    (No ``from __future__ import annotations`` in this file: the wrapper reads these types.)"""

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
    mapName: Annotated[str, Choice(list(MAP_NAMES))] = "Grad-CAM"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    worklist: Path
    reviewDatabase: Path
    reviewer: str
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
        self._timer = None
        self._review = None

    # ------------------------------------------------------------------ setup
    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RANOResponse.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RANOResponseLogic()

        from RANOResponseLib.model.device import gpu_choices

        for device, label in gpu_choices():
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.verdictComboBox.addItems(["CR", "PR", "SD", "PD"])

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadStudiesButton.connect("clicked(bool)", self.onLoadStudies)
        self.ui.fitRoiButton.connect("clicked(bool)", self.onFitRoi)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.saveSceneButton.connect("clicked(bool)", self.onSaveScene)
        self.ui.openWorklistButton.connect("clicked(bool)", self.onOpenWorklist)
        self.ui.previousCaseButton.connect("clicked(bool)", lambda: self.onStep("previous"))
        self.ui.nextCaseButton.connect("clicked(bool)", lambda: self.onStep("next"))
        self.ui.firstUnreviewedButton.connect("clicked(bool)", lambda: self.onStep("first_unreviewed"))
        self.ui.measureButton.connect("clicked(bool)", self.onMeasure)
        self.ui.agreeButton.connect("clicked(bool)", lambda: self.onSaveVerdict(agree=True))
        self.ui.saveVerdictButton.connect("clicked(bool)", lambda: self.onSaveVerdict(agree=False))
        self.ui.exportVerdictsButton.connect("clicked(bool)", self.onExportVerdicts)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.initializeParameterNode()

    def cleanup(self):
        self._cancelJob()
        self.removeObservers()
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)

    def onSceneStartClose(self, caller, event):
        self._cancelJob()
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
        needed = self.logic.requiredModalities(p.bundle)
        ready = all(getattr(p, f"baseline{m}") and getattr(p, f"followup{m}") for m in needed)
        if self._job is None:
            self.ui.applyButton.enabled = ready
            self.ui.applyButton.toolTip = ("Register, crop, classify and compute the maps" if ready else
                                           "Assign baseline and follow-up volumes for " + ", ".join(needed))
        self.logic.showMap(p)

    def onDeviceChanged(self, index):
        device = self.ui.deviceComboBox.itemData(index)
        _, warning = self.logic.chooseDevice(device)
        self.ui.deviceWarningLabel.text = warning or ""

    def onLoadStudies(self):
        p = self._parameterNode
        if not self.logic.ensurePackages():
            return
        with slicer.util.tryWithErrorDisplay("Could not load the studies.", waitCursor=True):
            for role in ("baseline", "followup"):
                folder = getattr(p, f"{role}Folder")
                if folder and str(folder) not in ("", "."):
                    for modality, node in self.logic.loadStudy(folder, role).items():
                        setattr(p, f"{role}{modality}", node)
            if p.baselineCT1 or p.baselineT1:
                slicer.util.setSliceViewerLayers(background=p.baselineCT1 or p.baselineT1, fit=True)

    def onFitRoi(self):
        p = self._parameterNode
        if not self.logic.ensurePackages():
            return
        with slicer.util.tryWithErrorDisplay("Could not fit the region.", waitCursor=True):
            p.roi = self.logic.fitRoi(p)

    def onApply(self):
        if self._job is not None:  # Apply is Cancel while a run is going
            self._cancelJob()
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            return
        with slicer.util.tryWithErrorDisplay("Could not start the prediction.", waitCursor=True):
            if not self.logic.ensurePackages():
                return
            device, warning = self.logic.chooseDevice(self.ui.deviceComboBox.currentData)
            if warning:
                self.ui.deviceWarningLabel.text = warning
            self._job = self.logic.startPrediction(self._parameterNode, device)
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
        self._setRunning(False)
        with slicer.util.tryWithErrorDisplay("RANO response prediction failed.", waitCursor=True):
            summary = self.logic.finishPrediction(self._parameterNode, job)
            self.ui.resultLabel.text = self.logic.resultHtml(summary)
            self.ui.statusLabel.text = f"Done in {job.run.elapsed:.1f} s on {summary.get('device', '?')}."

    def _setRunning(self, running):
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        for name in ("loadStudiesButton", "fitRoiButton", "inputsCollapsibleButton", "modelCollapsibleButton"):
            getattr(self.ui, name).enabled = not running

    def _cancelJob(self):
        if self._timer:
            self._timer.stop()
        if self._job is not None:
            self.logic.cancel(self._job)
            self._job = None
            self._setRunning(False)

    def onSaveScene(self):
        import qt

        path = qt.QFileDialog.getSaveFileName(None, "Save results as a scene", "", "Slicer scene (*.mrml)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the scene.", waitCursor=True):
                self.logic.saveScene(path)

    # ---------------------------------------------------------------- review
    def onOpenWorklist(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not open the worklist.", waitCursor=True):
            self._review = self.logic.openReview(p.worklist, p.reviewDatabase, p.reviewer)
            self._showCase()

    def onStep(self, where):
        if self._review is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not open the case.", waitCursor=True):
            getattr(self._review, where)()
            self._showCase()

    def _showCase(self):
        case = self._review.current
        folders = self.logic.caseFolders(case)
        p = self._parameterNode
        p.baselineFolder, p.followupFolder = Path(folders[0]), Path(folders[1])
        self.ui.caseLabel.text = self.logic.caseText(self._review)
        self.ui.measurementLabel.text = ""
        self.onLoadStudies()

    def onMeasure(self):
        if self._review is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not measure the lesions.", waitCursor=True):
            self.ui.measurementLabel.text = self.logic.measureCase(
                self._review.current, self._parameterNode,
                onChange=lambda html: setattr(self.ui.measurementLabel, "text", html))

    def onSaveVerdict(self, agree):
        if self._review is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not save the verdict.", waitCursor=True):
            self.logic.saveVerdict(self._review, self._parameterNode, agree=agree,
                                   label=self.ui.verdictComboBox.currentText,
                                   confidence=int(self.ui.confidenceSlider.value),
                                   note=self.ui.noteEdit.toPlainText())
            self.ui.noteEdit.setPlainText("")
            self.ui.caseLabel.text = self.logic.caseText(self._review)

    def onExportVerdicts(self):
        import qt

        path = qt.QFileDialog.getSaveFileName(None, "Export verdicts as training labels", "", "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not export the verdicts.", waitCursor=True):
                self.logic.exportVerdicts(self._parameterNode.reviewDatabase, path)

    def onReport(self):
        import qt

        path = qt.QFileDialog.getSaveFileName(None, "Case report", "", "PDF (*.pdf)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not write the report.", waitCursor=True):
                self.logic.writeReport(self._parameterNode, path, self._review)


class RANOResponseLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry points; each is a call into RANOResponseLib with the current scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastJob = None
        self.lastNodes = None
        self.lastAssessment = None
        self._stopObserving = None
        self._modalities = (None, MODALITIES)

    def getParameterNode(self):
        return RANOResponseParameterNode(super().getParameterNode())

    def requiredModalities(self, bundle_path=None) -> tuple[str, ...]:
        """The bundle's modalities; asked on every parameter change (slider drags included), so
        bundle.json is read again only when the path or the file's modification time changes."""
        try:  # before the packages are installed, or with a bad bundle path: Apply reports it
            from RANOResponseLib.model.bundle import default_bundle_path, read_bundle

            path = Path(bundle_path) if bundle_path and str(bundle_path) not in ("", ".") else default_bundle_path()
            meta = path if path.is_file() else path / "bundle.json"  # read_bundle takes either
            key = (str(path), meta.stat().st_mtime_ns)
            if self._modalities[0] != key:
                self._modalities = (key, tuple(read_bundle(path).spec.modalities))
        except Exception:
            return MODALITIES
        return self._modalities[1]

    @staticmethod
    def chooseDevice(requested):
        from RANOResponseLib.model.device import choose_device

        return choose_device(requested or "auto")

    def loadStudy(self, folder, role):
        from RANOResponseLib.mrml.scene import load_study_nodes

        return load_study_nodes(slicer.mrmlScene, Path(folder), MODALITIES, role)

    def fitRoi(self, p):
        from RANOResponseLib.model.bundle import read_bundle
        from RANOResponseLib.mrml.scene import fit_roi

        bundle = read_bundle(p.bundle if p.bundle and str(p.bundle) not in ("", ".") else None)
        reference = getattr(p, f"baseline{bundle.spec.reference_modality}")
        return fit_roi(slicer.mrmlScene, reference, bundle.spec, "RANO crop region")

    @staticmethod
    def ensurePackages() -> bool:
        """Install what the core needs after asking: torch through PyTorchUtils, the rest with pip."""
        from RANOResponseLib.mrml.dependencies import missing_packages, torch_missing

        if torch_missing():
            if not slicer.util.confirmOkCancelDisplay(
                    "RANO Response needs PyTorch. Install it now (PyTorch extension)? This may take minutes."):
                return False
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager first.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                return False
        missing = missing_packages()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    "RANO Response needs these Python packages:\n  " + "\n  ".join(missing) + "\nInstall them now?"):
                return False
            slicer.util.pip_install(missing)
        return True

    def startPrediction(self, p, device):
        from RANOResponseLib.mrml.process import slicer_python
        from RANOResponseLib.mrml.runner import PredictRequest, start_predict

        modalities = self.requiredModalities(p.bundle)
        request = PredictRequest(
            baseline={m: getattr(p, f"baseline{m}") for m in MODALITIES},
            followup={m: getattr(p, f"followup{m}") for m in MODALITIES},
            modalities=modalities,
            bundle=p.bundle if p.bundle and str(p.bundle) not in ("", ".") else None,
            device=device, roi=p.roi)
        self.lastJob = start_predict(request, python=slicer_python())
        return self.lastJob

    @staticmethod
    def cancel(job):
        from RANOResponseLib.mrml.runner import discard

        discard(job)

    def finishPrediction(self, p, job) -> dict:
        from RANOResponseLib.mrml.runner import finish_predict

        nodes = finish_predict(slicer.mrmlScene, job)
        self.lastNodes = nodes
        scene = slicer.mrmlScene
        p.transform = scene.GetNodeByID(nodes.transform)
        p.gradcam = scene.GetNodeByID(nodes.gradcam) if nodes.gradcam else None
        p.saliency = scene.GetNodeByID(nodes.saliency) if nodes.saliency else None
        p.table = scene.GetNodeByID(nodes.table)
        if nodes.roi and p.roi is None:
            p.roi = scene.GetNodeByID(nodes.roi)
        self.showMap(p)
        return nodes.summary

    @staticmethod
    def showMap(p):
        from RANOResponseLib.mrml.scene import show_overlay

        fg = p.gradcam if p.mapName == "Grad-CAM" else p.saliency
        bg = p.baselineCT1 or p.baselineT1
        if bg is not None and fg is not None:
            show_overlay(slicer.mrmlScene, bg, fg, opacity=p.opacity)

    @staticmethod
    def resultHtml(summary: dict) -> str:
        rows = "".join(
            f"<tr><td>{c}</td><td align='right'>{v:.2f}</td><td align='right'>± {summary.get('ensemble_spread', {}).get(c, 0):.2f}</td></tr>"
            for c, v in summary["probabilities"].items())
        return (f"<b>Predicted: {summary['label']}</b> &nbsp; (model {summary['bundle']['id']})"
                f"<table>{rows}</table><i>Research use only, not for clinical use.</i>")

    @staticmethod
    def saveScene(path):
        from RANOResponseLib.mrml.scene import write_scene

        write_scene(slicer.mrmlScene, Path(path))

    # review panel: RANOResponseLib.review / measurement_scene / rano_rules / report
    @staticmethod
    def openReview(worklist, database, reviewer):
        from RANOResponseLib.review.store import open_session

        return open_session(Path(worklist), Path(database), reviewer)

    @staticmethod
    def caseFolders(case):
        return case.baseline, case.followup

    @staticmethod
    def caseText(session) -> str:
        from RANOResponseLib.review.store import session_text

        return session_text(session)

    def _jobFor(self, case):
        """The last prediction if it was made on this case's two folders."""
        job = self.lastJob
        if job and self.lastNodes and {str(Path(v).resolve()) for v in job.inputs.values()} == {
                str(Path(case.baseline).resolve()), str(Path(case.followup).resolve())}:
            return job
        return None

    def measureCase(self, case, p, onChange=None):
        """Measure, draw the diameters, apply RANO; ``onChange(html)`` is called when a line moves."""
        from RANOResponseLib.mrml.measurement_scene import (
            assess_case,
            assessment_html,
            observe_lines,
            reassess,
        )

        if getattr(self, "_stopObserving", None):
            self._stopObserving()
        job = self._jobFor(case)
        tfm = job.out / "followup_to_baseline.tfm" if job else None
        self.lastAssessment = assess_case(
            slicer.mrmlScene, case.baseline, case.followup, transform=tfm,
            followup_transform_node_id=p.transform.GetID() if (job and p.transform) else None,
            prediction=self.lastNodes.summary if job else None)

        def moved():
            self.lastAssessment = reassess(slicer.mrmlScene, self.lastAssessment)
            if onChange:
                onChange(assessment_html(self.lastAssessment))

        self._stopObserving = observe_lines(self.lastAssessment.lines, moved)
        return assessment_html(self.lastAssessment)

    def saveVerdict(self, session, p, agree, label, confidence, note):
        job = self._jobFor(session.current)
        assessment = getattr(self, "lastAssessment", None)
        session.save(label=None if agree else label, confidence=confidence, note=note,
                     prediction=self.lastNodes.summary if job else None,
                     rule=assessment.rule if assessment else None)

    @staticmethod
    def exportVerdicts(database, path):
        from RANOResponseLib.review.store import ReviewStore

        with ReviewStore(Path(database), create=False) as store:
            store.export_csv(Path(path))

    def writeReport(self, p, path, session):
        import tempfile

        from RANOResponseLib.rano.rules import write_assessment
        from RANOResponseLib.review.report import write_report

        job = self._jobFor(session.current) if session else self.lastJob
        if job is None:
            raise ValueError("Run Apply on this case first: the report is built from its prediction.")
        measurements = None
        assessment = getattr(self, "lastAssessment", None)
        if assessment is not None:
            measurements = Path(tempfile.mkdtemp(prefix="RANOResponse-report-")) / "measurements.json"
            write_assessment(measurements, assessment.pair, assessment.rule, assessment.comparison)
        write_report(job.out, Path(path), measurements=measurements,
                     db=p.reviewDatabase if session else None,
                     case_id=session.current.case_id if session else None)


class RANOResponseTest(ScriptedLoadableModuleTest):
    """Runs the module logic in Slicer on a generated phantom pair (no data download)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_pair_end_to_end()
        self.setUp()
        self.test_cancel_leaves_scene_clean()

    def _phantom(self):
        import tempfile

        from RANOResponseLib.demo import demo_case

        root = Path(tempfile.mkdtemp(prefix="RANOResponseTest-"))
        baseline, followup, _ = demo_case(root / "phantom", spacing=3.0)
        logic = RANOResponseLogic()
        p = logic.getParameterNode()
        for role, folder in (("baseline", baseline), ("followup", followup)):
            for modality, node in logic.loadStudy(folder, role).items():
                setattr(p, f"{role}{modality}", node)
        return logic, p

    def test_phantom_pair_end_to_end(self):
        self.delayDisplay("Predicting on a phantom pair")
        logic, p = self._phantom()
        job = logic.startPrediction(p, "cpu")
        summary = logic.finishPrediction(p, job)
        self.assertAlmostEqual(sum(summary["probabilities"].values()), 1.0, places=4)
        self.assertIn(summary["label"], summary["probabilities"])
        self.assertIsNotNone(p.transform)
        self.assertEqual(p.followupCT1.GetTransformNodeID(), p.transform.GetID())
        self.assertIsNotNone(p.gradcam)
        self.assertGreater(p.table.GetNumberOfRows(), 0)
        self.delayDisplay("Test passed")

    def test_cancel_leaves_scene_clean(self):
        logic, p = self._phantom()
        before = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.startPrediction(p, "cpu")
        logic.cancel(job)
        self.assertFalse(job.run.running)
        self.assertFalse(job.workdir.exists())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")
