"""data: what the training loop reads.

- :mod:`.dataset` preprocessing cache (.npy per pair), the bundle's input statistics, MONAI datasets
                  and augmentation
- :mod:`.labels`  reviewers' verdicts (a review export) as training labels
- :mod:`.segmentation_data` masked timepoints of a cohort prepared for segmentation training (.npz cache)

May import: RANOResponseLib (core, imaging, datasets, model, and inference for the one input
preparation predict uses), MONAI, torch.
"""
