"""imaging: images as they come in, and the model input made from them.

- :mod:`.io`            reading studies and images (checked), writing images
- :mod:`.brain`         skull-stripped or not, brain masks from stripped images and mask files
- :mod:`.dicom`         DICOM folders: listing series, assigning them to modalities (rules), reading one
- :mod:`.studies`       loading a study folder of files or DICOM (:func:`~.studies.load_study`), pair checks
- :mod:`.geometry`      LPS <-> RAS, the model grid, resampling
- :mod:`.registration`  rigid registration (each sequence onto its study's reference, follow-up onto baseline)
- :mod:`.preprocessing` channels, input spec, normalisation, the prepared pair

May import: :mod:`RANOResponseLib.core`, SimpleITK, nibabel, pydicom, numpy. No torch, no MRML.
"""
