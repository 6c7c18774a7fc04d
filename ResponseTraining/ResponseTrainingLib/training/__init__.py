"""training: patient-grouped cross-validation of response classifiers, lowest module first.

- :mod:`.hybrid` scikit-learn classifiers on network outputs (+ clinical data) inside the folds
- :mod:`.config` :class:`~.config.TrainConfig`: every setting of a run and its default (the CLI
                 and the Slicer widget read the defaults here); architectures, channel sets, weightings
- :mod:`.folds`  patient-grouped test folds and validation splits, class weights
- :mod:`.loop`   one fold's training: epoch order, DDP / gradient shards, checkpoints and resume
- :mod:`.card`   provenance without machine paths, the CV table and the bundle's model card
- :mod:`.cv`     a whole run: pairs, folds, preprocessing, the fold loop, hybrids, aggregation,
                 the fold-ensemble bundle
- :mod:`.segmentation`    ``train-seg``: architectures, augmentation, one fold's training and resume
- :mod:`.segmentation_cv` a whole ``train-seg`` run (folds, native-resolution test Dice, the
                          segmentation bundle and its card), the architecture comparison, the CLI
- :mod:`.experiment` the reference study's experiments: a named grid of CV runs, one table

May import: RANOResponseLib, :mod:`ResponseTrainingLib.data`, :mod:`ResponseTrainingLib.analysis`.
:mod:`.config` imports only the standard library and :mod:`RANOResponseLib.core` at load time
(the Slicer module reads it before torch or scikit-learn may be installed).
"""
