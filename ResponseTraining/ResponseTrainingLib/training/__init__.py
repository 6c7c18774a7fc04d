"""training: patient-grouped cross-validation of response classifiers.

- :mod:`.cv`     configuration, folds, the training loop (DDP, checkpoints, resume), aggregation,
                 the fold-ensemble bundle and its card
- :mod:`.hybrid` scikit-learn classifiers on network outputs (+ clinical data) inside the folds

May import: RANOResponseLib, :mod:`ResponseTrainingLib.data`, :mod:`ResponseTrainingLib.analysis`.
"""
