"""inference: running a bundle on a pair of studies.

- :mod:`.attributions` ensemble prediction, saliency and Grad-CAM (Captum)
- :mod:`.guard`        the input guard: refuse what is not a brain MRI pair, warn about inputs unlike
                       the bundle's training data (its ``input_statistics``)
- :mod:`.inputs`       the network input from two studies (brain masks, sequences aligned, registration,
                       model grid), shared by predict and training
- :mod:`.pipeline`     predict: read, register, crop, infer, write outputs atomically; writers
                       for the scene and pictures are injected by the caller
- :mod:`.overlay`      the matplotlib overlay picture (when no MRML is at hand)

May import: core, imaging, datasets, rano, model. Not review or mrml.
"""
