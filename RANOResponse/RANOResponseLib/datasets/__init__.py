"""datasets: research data sets as distributed, read for both the clinical side and training.

- :mod:`.lumiere` LUMIERE's folders and rating CSVs -> baseline/follow-up pairs with labels

May import: :mod:`RANOResponseLib.core`, :mod:`RANOResponseLib.imaging`, pandas.
"""
