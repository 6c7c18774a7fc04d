"""RANOResponseLib: the clinical core of the RANOResponse Slicer extension, without Qt.

Everything here runs without the Slicer application (no Qt, no ctk, no application object): the
``rano-response`` command, the Slicer module, the training module and the web station call these
same functions. Sub-packages, lowest first; each may import only those listed before it:

- :mod:`~RANOResponseLib.core`       names (modalities, classes), errors, atomic files, display styles
- :mod:`~RANOResponseLib.imaging`    reading studies, geometry, registration, preparing the model input
- :mod:`~RANOResponseLib.rano`       lesion measurement and the RANO decision rules
- :mod:`~RANOResponseLib.datasets`   data sets as distributed (the LUMIERE reader)
- :mod:`~RANOResponseLib.model`      networks, model bundles, the device policy
- :mod:`~RANOResponseLib.inference`  prediction with saliency and Grad-CAM, the predict pipeline
- :mod:`~RANOResponseLib.review`     the review store (verdicts) and the PDF case report
- :mod:`~RANOResponseLib.mrml`       the Slicer scene (MRML nodes, slice views, the child process)
- :mod:`~RANOResponseLib.phantom`    synthetic LUMIERE-like cohorts (tests, demos; not the runtime)
- :mod:`~RANOResponseLib.web`        the review station in the browser (trame-slicer; the ``web`` extra)

Data path: study folder (NIfTI/NRRD or DICOM) -> :func:`imaging.studies.load_study` ->
:func:`inference.inputs.prepare_inputs` (brain masks, each study's sequences aligned by
:func:`imaging.registration.align_study`, :func:`imaging.registration.register_rigid`,
:func:`imaging.preprocessing.prepare_pair`: model grid, normalised inside the brain, stacked
channels) -> :mod:`inference.guard` (refuse or warn) -> :mod:`model` / :mod:`inference.attributions`
-> maps resampled onto the baseline grid, masked by the brain -> files written atomically
(:mod:`inference.pipeline`). :mod:`cli` (the core's commands), :mod:`demo` and :mod:`bench`
sit on top. Nothing here imports ``ResponseTrainingLib``.
"""

__version__ = "0.1.0"
