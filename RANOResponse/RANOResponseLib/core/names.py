"""The project's vocabulary, defined once: modalities, their reference order, response classes.

Every other module, the Slicer widgets and the training code import these names from here.
"""

from __future__ import annotations

# The four sequences of a study, in the order the reference study stacks them and in which a
# study's reference image is chosen (the first one present): contrast-enhanced T1 first.
MODALITIES: tuple[str, ...] = ("CT1", "T1", "T2", "FLAIR")
REFERENCE_ORDER: tuple[str, ...] = MODALITIES

# RANO response classes, in the order of the network's outputs.
CLASS_NAMES: tuple[str, ...] = ("CR", "PR", "SD", "PD")

# How a rated follow-up finds its baseline (RANOResponseLib.datasets.lumiere.build_pairs): the scan
# right before it, or the latest reference visit (Post-Op / PR / CR nadir, as BraTPRO pairs them).
PAIRINGS: tuple[str, ...] = ("previous", "reference")

# Segmentation labels in LUMIERE / DeepBraTumIA order.
LABEL_ENHANCING = 1
LABEL_CORE = 2  # necrotic / non-enhancing core (and the resection cavity)
LABEL_EDEMA = 3
# what each label is called (segment names in Slicer, bundle label names, reports)
LABEL_NAMES: dict[int, str] = {LABEL_ENHANCING: "enhancing", LABEL_CORE: "necrotic / non-enhancing",
                               LABEL_EDEMA: "edema"}
# Network input channels made from a timepoint's tumour segmentation (``seg-enhancing:followup``:
# the fraction of each model-grid voxel the segmentation labels enhancing): the name used in a
# channel in place of a modality -> the label it is made from.
TUMOUR_CHANNELS: dict[str, int] = {"seg-enhancing": LABEL_ENHANCING, "seg-core": LABEL_CORE, "seg-edema": LABEL_EDEMA}


def reference_modality(available, order: tuple[str, ...] = REFERENCE_ORDER) -> str:
    """The first modality of ``order`` that is in ``available``."""
    for m in order:
        if m in available:
            return m
    raise KeyError(f"none of {', '.join(order)} available")
