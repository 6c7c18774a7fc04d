"""analysis: how good a model is.

- :mod:`.metrics`     balanced accuracy, F1, AUC, confusion matrices, per-fold summaries, bootstrap intervals
- :mod:`.calibration` temperature scaling per fold, ECE, reliability, the "uncertain" thresholds
- :mod:`.plots`       confusion matrices, ROC curves, learning curves, reliability diagrams, experiment grids
- :mod:`.evaluate`    a bundle on a labelled cohort (parallel workers, resumable)
- :mod:`.segmentation_metrics` Dice per tumour region, the small-lesion threshold, segmentation plots

May import: RANOResponseLib, :mod:`ResponseTrainingLib.data`.
"""
