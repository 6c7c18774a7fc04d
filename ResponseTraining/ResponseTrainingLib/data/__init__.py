"""data: what the training loop reads.

- :mod:`.dataset` preprocessing cache (.npy per pair), MONAI datasets and augmentation
- :mod:`.labels`  reviewers' verdicts (a review export) as training labels

May import: RANOResponseLib (core, imaging, datasets), MONAI, torch.
"""
