"""core: what every other part shares, and imports nothing else of the project.

- :mod:`.names`  modality names and their reference order, RANO classes, segmentation labels
- :mod:`.errors` the error types that become a one-line message and exit status 2
- :mod:`.files`  atomic writes (files and whole output folders)
- :mod:`.styles` display windows, map colour maps and thresholds (scene, pictures, PDF)
- :mod:`.outputs` the file names predict writes, and the one reader of its ``prediction.json``

May import: the standard library and numpy.
"""
