"""What the training module needs in Slicer's Python: the clinical runtime's packages and more.

The runtime's list and the install-after-asking live in :mod:`RANOResponseLib.mrml.dependencies`;
this adds what only training imports. Ranges as in ``pyproject.toml`` (a test keeps them equal).
"""

from __future__ import annotations

from RANOResponseLib.mrml.dependencies import RUNTIME, Dependency

# imported by ResponseTrainingLib, not by the clinical runtime
TRAINING_ONLY: tuple[Dependency, ...] = (
    Dependency("sklearn", "scikit-learn>=1.5,<2"),  # folds, hybrid classifiers, metrics
)
TRAINING: tuple[Dependency, ...] = RUNTIME + TRAINING_ONLY
# the module's self-test trains on a phantom cohort, whose generator reads nilearn's template
PHANTOM: tuple[Dependency, ...] = (Dependency("nilearn", "nilearn>=0.12,<0.15"),)
