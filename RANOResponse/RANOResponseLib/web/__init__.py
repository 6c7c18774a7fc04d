"""web: the review station in the browser (``rano-response review serve``), on trame-slicer.

- :mod:`.predictions` the server's prediction service: models loaded once, one run per case
- :mod:`.router`      token check, one station process per browser session, reverse proxy
- :mod:`.station`     one reviewer's page: Slicer slice views of the real MRML scene, verdicts

The top of the core: it serves what the layers below compute. Needs the ``web`` extra
(trame-slicer; see the README's "Review sessions in the browser").

May import: everything below it in :mod:`RANOResponseLib` except :mod:`~RANOResponseLib.phantom`
(not the runtime); trame, trame-slicer, aiohttp.
"""
