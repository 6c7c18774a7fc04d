"""ResponseTraining: train and evaluate response classifiers; also a headless entry point.

The same arguments work three ways:

    rano-response train --data DIR --out RUN [...]
    python ResponseTraining/ResponseTraining.py train --data DIR --out RUN [...]
    Slicer --no-main-window --python-script ResponseTraining/ResponseTraining.py -- train --data DIR --out RUN [...]

The training logic lives in ResponseTrainingLib (no Qt). The module's GUI (dataset, folds,
architecture, progress, metrics plots) is tracked in the issue "The Slicer modules".
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.join(os.path.dirname(_HERE), "RANOResponse")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def run_cli(argv: list[str]) -> int:
    """Entry point shared by plain Python and ``Slicer --python-script``."""
    args = [a for a in argv if a != "--"]
    if args and args[0] == "train":
        args = args[1:]
    from ResponseTrainingLib.cli import main

    return main(args)


try:  # inside Slicer: register the module
    from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget

    class ResponseTraining(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            parent.title = "RANO Response Training"
            parent.categories = ["Quantification"]
            parent.contributors = ["RANOResponse developers"]
            parent.helpText = ("Train RANO response classifiers on a LUMIERE-layout cohort and export the "
                               "model bundle used by the RANO Response module. Research use only.")

    class ResponseTrainingWidget(ScriptedLoadableModuleWidget):
        def setup(self):
            import qt

            ScriptedLoadableModuleWidget.setup(self)
            label = qt.QLabel("Run training headless for now:\n"
                              "Slicer --no-main-window --python-script ResponseTraining.py -- train --data DIR --out RUN")
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)

except ImportError:  # plain Python: no Slicer, the CLI still works
    pass


if __name__ == "__main__":
    code = run_cli(sys.argv[1:])
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        sys.modules["slicer"].app.exit(code)
    sys.exit(code)
