"""inference: running a bundle on a pair of studies.

- :mod:`.attributions` ensemble prediction, saliency and Grad-CAM (Captum)
- :mod:`.pipeline`     predict: read, register, crop, infer, write outputs atomically; writers
                       for the scene and pictures are injected by the caller
- :mod:`.overlay`      the matplotlib overlay picture (when no MRML is at hand)

May import: core, imaging, model. Not rano, review or mrml.
"""
