"""What ``rano-response predict`` writes into its output folder: the file names, and the one reader
of its ``prediction.json``.

Here, below every other layer, so that measuring, reviewing and reporting can read a prediction
without importing the pipeline (and torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from RANOResponseLib.core.errors import RANOInputError

SCENE_FILE = "scene/RANOResponse.mrml"  # the Slicer scene predict writes (data files referred to)
SLICE_VIEWS = ("slice_axial.png", "slice_coronal.png", "slice_sagittal.png")
PREDICTION_JSON = "prediction.json"
TRANSFORM_FILE = "followup_to_baseline.tfm"  # the registration, baseline point -> follow-up point
BRAIN_MASK_FILE = "brain_mask.nii.gz"  # the baseline brain mask on the baseline reference grid
# each timepoint's automatic tumour labels (1 enhancing, 2 necrotic / non-enhancing, 3 edema) on
# its own reference grid
SEGMENTATION_FILES = {"baseline": "segmentation_baseline.nii.gz", "followup": "segmentation_followup.nii.gz"}
OUTPUT_NAMES = (PREDICTION_JSON, "saliency.nii.gz", "gradcam.nii.gz", TRANSFORM_FILE, BRAIN_MASK_FILE,
                *SEGMENTATION_FILES.values(), "overlay.png", *SLICE_VIEWS, SCENE_FILE.split("/")[0])


def read_prediction(path: Path | str) -> dict:
    """The summary :func:`write_outputs` wrote: ``prediction.json`` of a predict output folder
    (``path``) or the file itself (a path ending in ``.json``).

    Raises :class:`RANOInputError` naming the file when it is missing, not JSON, or not a
    prediction (a ``label`` string and ``probabilities`` mapping class names to numbers).
    """
    p = Path(path)
    if p.is_dir() or p.suffix.lower() != ".json":
        p = p / PREDICTION_JSON
    if not p.is_file():
        raise RANOInputError(f"{p}: not found (is {p.parent} a `rano-response predict` output folder?)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RANOInputError(f"{p}: not valid JSON ({e})") from None
    probs = d.get("probabilities") if isinstance(d, dict) else None
    if not isinstance(d, dict) or not isinstance(d.get("label"), str) or not isinstance(probs, dict):
        raise RANOInputError(f"{p}: not a prediction (needs a 'label' and 'probabilities')")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in probs.values()):
        raise RANOInputError(f"{p}: not a prediction ('probabilities' must map class names to numbers)")
    return d


def prediction_studies(prediction: dict) -> dict[str, Path]:
    """The two study folders a prediction was made on (``baseline``, ``followup``), from its inputs
    description: a DICOM series' recorded path is its study folder, a file's folder is its parent.
    Missing when prediction.json does not name them."""
    inputs = prediction.get("inputs") or {}
    folders: dict[str, Path] = {}
    for tp in ("baseline", "followup"):
        sequences = ((inputs.get("studies") or {}).get(tp) or {}).get("sequences") or {}
        for m, path in (inputs.get(tp) or {}).items():
            source = (sequences.get(m) or {}).get("source") or {}
            folders[tp] = Path(source["path"]) if source.get("kind") == "dicom" else Path(path).parent
            break
    return folders
