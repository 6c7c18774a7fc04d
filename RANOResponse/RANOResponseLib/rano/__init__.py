"""rano: RANO measured from segmentations, and the one table of RANO decision rules.

- :mod:`.measurement` lesions, bidimensional products, volumes, matching through the registration
- :mod:`.rules`       the one RANO decision table (RANO and RANO 2.0), its reasoning; comparison with the network

May import: core, imaging, and from :mod:`RANOResponseLib.inference.pipeline` only its output names
and :func:`~RANOResponseLib.inference.pipeline.read_prediction` (the one reader of ``prediction.json``).
"""
