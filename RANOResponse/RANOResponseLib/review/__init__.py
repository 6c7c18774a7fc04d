"""review: what radiologists do with a prediction.

- :mod:`.worklist` worklists: case pairs from a CSV or a LUMIERE folder
- :mod:`.store`  verdicts (append-only SQLite history), review sessions, exports
- :mod:`.opinions` network, measured and suggested category, worded once for panel, report, station
- :mod:`.report` the two-page PDF case report (pages; its import point)
- :mod:`.report_inputs` what the case report shows, collected from files (``gather``)
- :mod:`.report_images` the case report's page-1 images; drawing shared with the course report
- :mod:`.course_report` a patient's course: the burden plot and the multi-page PDF (``timeline``)

May import: core, imaging, datasets, model, inference, rano. Not mrml.
"""
