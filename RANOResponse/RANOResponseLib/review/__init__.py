"""review: what radiologists do with a prediction.

- :mod:`.store`  worklists, verdicts (append-only SQLite history), review sessions, exports
- :mod:`.report` the two-page PDF case report

May import: core, imaging, datasets, model, inference, rano. Not mrml.
"""
