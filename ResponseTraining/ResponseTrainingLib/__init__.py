"""ResponseTrainingLib: training and evaluating RANO response models headless.

Built on :mod:`RANOResponseLib` (it imports the clinical core, never the reverse). Sub-packages,
lowest first; each may import RANOResponseLib and those listed before it:

- :mod:`~ResponseTrainingLib.data`     cached, augmented datasets of pairs; reviewers' verdicts as labels
- :mod:`~ResponseTrainingLib.analysis` metrics, plots, evaluation of a bundle on a labelled cohort
- :mod:`~ResponseTrainingLib.training` configuration, patient-grouped folds, the training loop, CV, hybrids

On top of them:

- :mod:`.cli`          ``rano-response train`` / ``evaluate`` (a plugin of the ``rano-response`` program)
- :mod:`.runs`         a run as the Slicer module sees it: the command for the widget's settings, the
                       child process, reading a run folder
- :mod:`.dependencies` the packages training needs in Slicer's Python beyond the clinical runtime's
"""
