"""The training module's side of a run without Slicer: one set of defaults (TrainConfig, argparse,
the widget's parameter node), the widget's settings as a command, the child process that runs it,
reading a run folder, the packages the module installs, and the module file itself, loaded with
stand-ins for the parts of Slicer that only the application has (parameterNodeWrapper and the
ScriptedLoadableModule bases)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import subprocess
import sys
import types
import typing
from pathlib import Path

import pandas as pd
import pytest
import vtk
from conftest import REPO, cli_env
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES, PAIRINGS
from ResponseTrainingLib.cli import build_parser, config_from_args
from ResponseTrainingLib.runs import (
    RANGES,
    WIDGET_ARCHS,
    bundle_folder,
    metrics_table,
    run_plots,
    start_training,
    train_arguments,
)
from ResponseTrainingLib.training.config import TrainConfig, default

MODULE_FILE = REPO / "ResponseTraining" / "ResponseTraining.py"


# ------------------------------------------------------------------------------ one set of defaults


def test_argparse_defaults_are_the_config_defaults():
    """Every option of `rano-response train` that is a TrainConfig field defaults to that field's default."""
    args = build_parser().parse_args(["--data", "d", "--out", "o"])
    cfg = config_from_args(args)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "out", "command"):
            continue
        assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.modalities == MODALITIES and cfg.epochs == 100  # the chosen defaults (see config.py)


def test_argv_gives_back_the_same_config():
    """TrainConfig.argv() is the command of a configuration: parsed, it is that configuration again."""
    cfg = TrainConfig(data=Path("cohort"), out=Path("/abs/run"), arch="densenet121", modalities=("T1", "FLAIR"),
                      channels="stack+difference", pairing="reference", labels=Path("verdicts.csv"), folds=3,
                      val_fraction=0.3, epochs=7, batch_size=6, lr=5e-4, weight_decay=0.02, patience=3,
                      plateau_patience=2, loss_weighting="equal", sampler_weighting="1-prevalence", seed=9,
                      device="cpu", spacing=(1.5, 2.0, 2.5), size=(48, 64, 48), dropout=0.2, augment=False,
                      clinical=True, hybrid=("knn", "svc"), hybrid_fit="trainval", grad_shards=2, only_fold=1,
                      cache=Path("c"), bundle_id="b", resume=True, progress_json=True)
    argv = cfg.argv()
    assert "--no-augment" in argv and "--clinical" in argv and argv[:4] == ["--data", "cohort", "--out", "/abs/run"]
    assert config_from_args(build_parser().parse_args(argv)) == cfg
    plain = TrainConfig(data=Path("d"), out=Path("o"))
    assert plain.argv() == ["--data", "d", "--out", "o"]
    assert config_from_args(build_parser().parse_args(plain.argv())) == plain


# ------------------------------------------------------------------------- the widget's command


def test_train_arguments_are_the_widget_settings():
    args = train_arguments(Path("/data/cohort"), "/runs/r1", arch="densenet169", modalities=" T1, FLAIR ",
                           pairing="reference", folds=3, loocv=False, epochs=12, seed=4, resume=True,
                           device="cuda:1")
    cfg = config_from_args(build_parser().parse_args(args))
    assert (cfg.data, cfg.out) == (Path("/data/cohort"), Path("/runs/r1"))
    assert (cfg.arch, cfg.modalities, cfg.pairing, cfg.folds, cfg.loocv) == (
        "densenet169", ("T1", "FLAIR"), "reference", 3, False)
    assert (cfg.epochs, cfg.seed, cfg.resume, cfg.device) == (12, 4, True, "cuda:1")
    loo = config_from_args(build_parser().parse_args(train_arguments(
        "d", "o", arch="compact", modalities="CT1,T1,T2,FLAIR", pairing="previous", folds=5, loocv=True,
        epochs=100, seed=0, resume=False, device=None)))
    assert loo.loocv and not loo.resume and loo.device == "auto" and loo.epochs == 100


@pytest.mark.parametrize("data, out, modalities, message", [
    (Path("."), "o", "T1", "dataset folder"),
    ("d", "", "T1", "output folder"),
    ("d", "o", "T1,DWI", "--modalities T1,DWI"),
    ("d", "o", "T1,T1", "distinct"),
])
def test_train_arguments_refuse_unusable_settings(data, out, modalities, message):
    with pytest.raises(RANOInputError, match=message):
        train_arguments(data, out, arch="compact", modalities=modalities, pairing="previous", folds=5,
                        loocv=False, epochs=1, seed=0, resume=False)


def test_start_training_runs_the_train_command_in_a_child(tmp_path):
    """The child is `rano-response train` (training commands included): a cohort without the
    rating CSV is its one-line error, exit status 2."""
    run = start_training(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--device", "cpu"],
                         python=sys.executable)
    assert run.wait(timeout=300) == 2
    assert "LUMIERE-ExpertRating" in run.error_message() and "expert rating CSV not found" in run.error_message()


# ------------------------------------------------------------------------------- a run folder


def test_metrics_table_plots_and_bundle_of_a_run_folder(tmp_path):
    with pytest.raises(RANOInputError, match="metrics.csv: not found"):
        metrics_table(tmp_path)
    pd.DataFrame({"model": ["cnn", "cnn"], "fold": ["0", "pooled"], "balanced_accuracy": [0.5, 0.25]}).to_csv(
        tmp_path / "metrics.csv", index=False)
    header, rows = metrics_table(tmp_path)
    assert header == ["model", "fold", "balanced_accuracy"]
    assert rows == [["cnn", "0", "0.5"], ["cnn", "pooled", "0.25"]]
    assert bundle_folder(tmp_path) is None
    (tmp_path / "bundle").mkdir()
    assert bundle_folder(tmp_path) is None  # a folder without bundle.json is not a bundle (yet)
    (tmp_path / "bundle" / "bundle.json").write_text("{}")
    assert bundle_folder(tmp_path) == tmp_path / "bundle"
    for name in ("plots/roc_cnn.png", "plots/confusion_cnn.png", "grid/a/plots/roc_cnn.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert run_plots(tmp_path) == [tmp_path / "grid/a/plots/roc_cnn.png", tmp_path / "plots/confusion_cnn.png",
                                   tmp_path / "plots/roc_cnn.png"]


# ------------------------------------------------------------------------------ packages in Slicer


def test_what_slicer_loads_first_needs_no_installed_package():
    """The module file imports these when Slicer loads it, before the user was asked to install
    anything: they must not pull in numpy, pandas, torch or scikit-learn."""
    code = ("import sys; import ResponseTrainingLib.runs, ResponseTrainingLib.training.config; "
            "import RANOResponseLib.core.names; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'pandas', 'torch', 'sklearn', 'SimpleITK', 'nibabel', 'scipy', 'monai', 'tqdm')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert res.returncode == 0, res.stdout + res.stderr


def test_training_dependencies_cover_the_training_imports_and_match_pyproject():
    from RANOResponseLib.mrml.dependencies import RUNTIME
    from ResponseTrainingLib.dependencies import PHANTOM, TRAINING, TRAINING_ONLY

    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for dep in TRAINING_ONLY + PHANTOM:
        assert f'"{dep.requirement}"' in pyproject, f"{dep.requirement} is not a dependency in pyproject.toml"
    imported = set()
    for path in (REPO / "ResponseTraining" / "ResponseTrainingLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"RANOResponseLib", "ResponseTrainingLib", "torch"}
    assert third_party and third_party <= {d.module for d in TRAINING}, third_party - {d.module for d in TRAINING}
    assert set(TRAINING) == set(RUNTIME) | set(TRAINING_ONLY)


# ----------------------------------------------------------------------------- the module file


def test_script_runs_evaluate_and_train_without_slicer(tmp_path):
    """`python ResponseTraining.py [--] evaluate|train ...` reaches the commands (one-line errors, exit 2)
    and never imports Slicer's GUI parts, which plain Python lacks."""
    for cmd in (["--", "evaluate", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "e")],
                ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "t")]):
        res = subprocess.run([sys.executable, str(MODULE_FILE), *cmd, "--device", "cpu"], capture_output=True,
                             text=True, env=cli_env())
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "LUMIERE-ExpertRating" in res.stderr


def test_module_file_hides_no_import_error_and_imports_no_module_file():
    """In Slicer an import error inside a `try ... except ImportError: pass` around the module
    becomes "no module class" without a traceback; another module's file is reached through the Lib."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    assert not [n for n in tree.body if isinstance(n, ast.Try)], "the module body is wrapped in try"
    silent = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler)
              and all(isinstance(b, ast.Pass) for b in h.body)]
    assert not silent, f"exceptions swallowed at lines {[h.lineno for h in silent]}"
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "RANOResponse" not in imported


class _Annotation:
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def module(monkeypatch):
    """ResponseTraining.py loaded as Slicer loads it, with stand-ins for what only the application has."""
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = type("Choice", (_Annotation,), {})
    wrapper.WithinRange = type("WithinRange", (_Annotation,), {})
    bases = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(bases, name, type(name, (), {"__init__": lambda self, parent=None: None}))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", bases)
    spec = importlib.util.spec_from_file_location("ResponseTraining", MODULE_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parameter_node_takes_defaults_and_ranges_from_the_lib(module):
    node = module.ResponseTrainingParameterNode
    hints = typing.get_type_hints(node, include_extras=True)
    for name in ("folds", "epochs", "seed"):
        (limits,) = [a for a in hints[name].__metadata__ if type(a).__name__ == "WithinRange"]
        assert limits.args == RANGES[name], name
    (archs,) = hints["architecture"].__metadata__
    (pairings,) = hints["pairing"].__metadata__
    assert archs.args == (list(WIDGET_ARCHS),) and pairings.args == (list(PAIRINGS),)
    assert (node.folds, node.epochs, node.seed, node.loocv) == (default("folds"), default("epochs"), 0, False)
    assert node.modalities == ",".join(default("modalities")) and node.architecture == default("arch")
    parent = types.SimpleNamespace()
    module.ResponseTraining(parent)
    assert parent.dependencies == ["RANOResponse"]


def test_logic_turns_the_parameter_node_into_the_command(module, tmp_path):
    p = types.SimpleNamespace(dataFolder=tmp_path / "d", outputFolder=tmp_path / "o", architecture="compact",
                              modalities="T2,FLAIR", pairing="previous", folds=4, loocv=False, epochs=3, seed=2,
                              resume=True)
    logic = module.ResponseTrainingLogic()
    cfg = config_from_args(build_parser().parse_args(logic.trainArguments(p, "cpu")))
    assert (cfg.data, cfg.out, cfg.modalities, cfg.folds, cfg.epochs, cfg.seed, cfg.resume, cfg.device) == (
        tmp_path / "d", tmp_path / "o", ("T2", "FLAIR"), 4, 3, 2, True, "cpu")
    assert logic.canTrain(p) and not logic.canTrain(types.SimpleNamespace(dataFolder=Path("."), outputFolder="o"))


class _Node(vtk.vtkObject):
    """A stand-in parameter node: a VTK object (observable) that records its GUI connections."""

    def __init__(self):
        super().__init__()
        self.loocv = False
        self.connected = 0

    def connectGui(self, ui):
        self.connected += 1
        return f"tag{self.connected}"

    def disconnectGui(self, tag):
        self.connected -= 1


def test_widget_follows_the_scene_and_cleans_up(module):
    w = module.ResponseTrainingWidget()
    w.ui = types.SimpleNamespace(foldsSpinBox=types.SimpleNamespace(), trainButton=types.SimpleNamespace())
    w.logic = types.SimpleNamespace(getParameterNode=_Node, canTrain=lambda p: True)
    w.parent = types.SimpleNamespace(isEntered=True)
    w.enter()
    first = w._parameterNode
    assert first.connected == 1 and w.ui.foldsSpinBox.enabled and w.ui.trainButton.enabled
    first.loocv = True
    first.Modified()  # a parameter change reaches the widget
    assert w.ui.foldsSpinBox.enabled is False

    w.onSceneStartClose(None, None)  # the scene goes: the node is let go
    assert w._parameterNode is None and first.connected == 0
    first.loocv = False
    first.Modified()
    assert w.ui.foldsSpinBox.enabled is False  # no longer observed
    w.onSceneEndClose(None, None)  # a new scene: a new parameter node, connected
    second = w._parameterNode
    assert second is not first and second.connected == 1 and w.ui.foldsSpinBox.enabled

    w.exit()  # module hidden: the GUI lets go, enter() takes it up again
    assert w._parameterNode is None and second.connected == 0
    w.enter()
    second = w._parameterNode

    calls = []
    w._run = types.SimpleNamespace(cancel=lambda: calls.append("cancel"))
    w._timer = types.SimpleNamespace(stop=lambda: calls.append("stop"),
                                     disconnect=lambda signal, slot: calls.append(("disconnect", signal, slot)))
    w.cleanup()
    assert calls == ["cancel", "stop", ("disconnect", "timeout()", w.onPoll)]
    assert second.connected == 0 and w._parameterNode is None and w._run is None
    assert not w.hasObserver(second, vtk.vtkCommand.ModifiedEvent, w.onParameterChanged)
    assert not any(w.Observations)
