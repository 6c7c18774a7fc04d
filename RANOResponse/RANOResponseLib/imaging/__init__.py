"""imaging: images as they come in, and the model input made from them.

- :mod:`.io`            reading studies and images (checked), writing images
- :mod:`.geometry`      LPS <-> RAS, the model grid, resampling
- :mod:`.registration`  rigid registration (follow-up onto baseline)
- :mod:`.preprocessing` channels, input spec, normalisation, the prepared pair

May import: :mod:`RANOResponseLib.core`, SimpleITK, nibabel, numpy. No torch, no MRML.
"""
