"""datasets: research data sets as distributed, read for both the clinical side and training.

- :mod:`.lumiere` LUMIERE's folders and rating CSVs -> baseline/follow-up pairs with labels
- :mod:`.samples` the sample case pairs shipped in ``Resources/Samples`` (self-tests, demos)

May import: :mod:`RANOResponseLib.core`, :mod:`RANOResponseLib.imaging`, :mod:`RANOResponseLib.rano`, pandas.
"""
