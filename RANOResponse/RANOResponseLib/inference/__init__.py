"""inference: running a bundle on a pair of studies.

- :mod:`.attributions` ensemble prediction, saliency and Grad-CAM (Captum)
- :mod:`.calibration`  the bundle's temperatures and "uncertain" thresholds, the suggested category
- :mod:`.explanations` how much of each map lies on tumour + edema (energy share, pointing game)
- :mod:`.guard`        the input guard: refuse what is not a brain MRI pair, warn about inputs unlike
                       the bundle's training data (its ``input_statistics``)
- :mod:`.inputs`       the network input from two studies (brain masks, sequences aligned, registration,
                       model grid), shared by predict and training
- :mod:`.pipeline`     predict: read, register, crop, infer, write outputs atomically; writers
                       for the scene and pictures are injected by the caller
- :mod:`.segmentation` tumour labels of one timepoint (a segmentation bundle on its sequences)
- :mod:`.measured`     RANO measured from both timepoints' labels, beside the network (prediction.json's ``measured``)
- :mod:`.overlay`      the matplotlib overlay picture (when no MRML is at hand)
- :mod:`.timeline`     ``rano-response timeline``: every timepoint of a patient segmented, measured and read
                       by the course rules, cached per timepoint (:mod:`.course_inputs` lists the studies,
                       :mod:`.course_lesions` follows the lesions)

May import: core, imaging, datasets, rano, model. Not review or mrml.
"""
