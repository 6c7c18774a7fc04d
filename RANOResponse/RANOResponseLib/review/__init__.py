"""review: what radiologists do with a prediction.

- :mod:`.store`  worklists, verdicts (append-only SQLite history), review sessions, exports
- :mod:`.report` the two-page PDF case report
- :mod:`.course_report` a patient's course: the burden plot and the multi-page PDF (``timeline``)

May import: core, imaging, datasets, model, inference, rano. Not mrml.
"""
