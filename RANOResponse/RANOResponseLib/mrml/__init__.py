"""mrml: the Slicer side without Qt. Scene code takes a ``vtkMRMLScene`` and is tested on slicer-core.

- :mod:`.scene`             studies, registration transform, crop ROI, map nodes, overlays, results table
- :mod:`.slice_views`       slice-logic pictures (axial/coronal/sagittal, montage)
- :mod:`.outputs`           the scene and pictures predict writes (writers injected into the pipeline)
- :mod:`.measurement_scene` diameters as line markups, reassessment when they move
- :mod:`.tumour_scene`      tumour segmentations as segmentation nodes, predict's measured RANO
- :mod:`.course_scene`      a patient's course: timepoints table, burden plots, a timepoint beside the baseline
- :mod:`.logic`             the RANO Response panel on a scene (studies, Apply, overlay, review, report)
- :mod:`.panel_text`        the results text: the network's class beside the measured ones
- :mod:`.course_panel`      the panel's Course section (run or load a timeline, show a timepoint)
- :mod:`.runner`            Apply: scene nodes -> study folders -> predict child -> nodes
- :mod:`.process`           the background child process (progress, cancel)
- :mod:`.dependencies`      which runtime packages are missing or incompatible in Slicer's Python

May import: everything below it in :mod:`RANOResponseLib`, vtk/MRML. Never Qt, ctk or the Slicer application object.
"""
