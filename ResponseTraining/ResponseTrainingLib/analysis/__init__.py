"""analysis: how good a model is.

- :mod:`.metrics`  balanced accuracy, F1, AUC, confusion matrices, per-fold summaries
- :mod:`.plots`    confusion matrices, ROC curves, learning curves
- :mod:`.evaluate` a bundle on a labelled cohort

May import: RANOResponseLib, :mod:`ResponseTrainingLib.data`.
"""
