"""rano: RANO measured from segmentations, and the one table of RANO decision rules.

- :mod:`.measurement` lesions, bidimensional products, volumes, matching through the registration
- :mod:`.rules`       the one RANO decision table (RANO and RANO 2.0), its reasoning; comparison with the network
- :mod:`.course`      the course-level rules on that table: baseline, nadir, confirmation, post-radiotherapy window

May import: core (including :mod:`~RANOResponseLib.core.outputs`, predict's file names and the one
reader of ``prediction.json``) and imaging. Below datasets, model and inference, so that predict, training's pairing and the
course of a patient use the same rules.
"""
