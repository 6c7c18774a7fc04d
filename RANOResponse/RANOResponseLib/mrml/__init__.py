"""mrml: the Slicer side without Qt. Scene code takes a ``vtkMRMLScene`` and is tested on slicer-core.

The scene (imported through :mod:`.scene`, which lists its parts), lowest first:

- :mod:`.volumes`           images and study folders <-> volume nodes (LPS <-> RAS), node attributes
- :mod:`.display`           map colours and styling, map nodes, slice views, the overlay
- :mod:`.transform_roi`     the registration as a transform node, the crop ROI
- :mod:`.scene_files`       a new scene, writing and reading ``.mrml`` / ``.mrb``
- :mod:`.measurement_scene` diameters as line markups, reassessment when they move
- :mod:`.tumour_scene`      tumour segmentations as segmentation nodes, predict's measured RANO
- :mod:`.assembly`          one prediction in a scene: brain mask, results table, :func:`~.assembly.assemble`
- :mod:`.prediction_scene`  a prediction from memory (``predict``'s scene) or from a predict folder
- :mod:`.scene`             the scene code's one import point
- :mod:`.slice_views`       slice-logic pictures (axial/coronal/sagittal, montage)
- :mod:`.outputs`           the scene and pictures predict writes (writers injected into the pipeline)
- :mod:`.course_scene`      a patient's course: timepoints table, burden plots, a timepoint beside the baseline

The panel (the Slicer module's logic) and what runs behind it:

- :mod:`.logic`             the RANO Response panel on a scene (studies, Apply, results, overlay)
- :mod:`.panel_state`       what the panel's sections share (parameters, shown result, node clean-up)
- :mod:`.review_panel`      the panel's Review section (worklist, measurement, verdicts, case report)
- :mod:`.course_panel`      the panel's Course section (run or load a timeline, show a timepoint)
- :mod:`.panel_text`        the results text: the network's class, the measured ones, the suggested one
- :mod:`.module_checks`     the module's self-test as functions (run by Slicer and by pytest)
- :mod:`.runner`            Apply: scene nodes -> study folders -> predict child -> nodes
- :mod:`.process`           the background child process (progress, cancel)
- :mod:`.dependencies`      which runtime packages are missing or incompatible in Slicer's Python

May import: everything below it in :mod:`RANOResponseLib`, vtk/MRML. Never Qt, ctk or the Slicer application object.
"""
