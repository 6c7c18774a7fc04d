"""phantom: synthetic LUMIERE-like cohorts with known truth, for tests, demos and training.

The shipped runtime never imports it. It lays out folders, rating CSVs and DeepBraTumIA-style
segmentations exactly as LUMIERE distributes them, from an ICBM152 template (nilearn's wheel).
Its RANO labels come from :mod:`RANOResponseLib.rano.rules`, the same table the review panel uses.

May import: core, imaging, datasets, rano.
"""
