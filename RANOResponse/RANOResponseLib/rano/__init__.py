"""rano: RANO measured from segmentations, and the one table of RANO decision rules.

- :mod:`.measurement` lesions, bidimensional products, volumes, matching through the registration
- :mod:`.rules`       RANO and RANO 2.0 categories with their reasoning; comparison with the network

May import: core, imaging (and :mod:`RANOResponseLib.inference.pipeline`'s output names only).
"""
