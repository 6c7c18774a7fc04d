"""RANOResponseLib: the headless core of the RANOResponse Slicer extension.

Everything here runs without the Slicer application (no Qt, no ctk, no application object):
the CLI, the Slicer module and the training module all call these same functions.

Data path: study folder -> :func:`io.read_study` (SimpleITK images with geometry)
-> :func:`preprocessing.register_rigid` -> :func:`preprocessing.prepare_pair` (model grid,
normalised, stacked channels) -> :mod:`model` / :mod:`attributions` -> maps resampled back onto
the baseline grid -> files written atomically (:mod:`pipeline`).
"""

__version__ = "0.1.0"

MODALITIES = ("CT1", "T1", "T2", "FLAIR")
CLASS_NAMES = ("CR", "PR", "SD", "PD")
