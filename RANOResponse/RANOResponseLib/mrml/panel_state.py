"""What the RANO Response panel's sections share: its parameters, the shown result, node clean-up.

:class:`PanelParameters` is the panel's state as the logic reads and writes it (the Slicer module's
``parameterNodeWrapper``, a plain object in tests); :class:`ShownResult` is the prediction the
scene shows; :func:`given` reads a path parameter; :func:`remove_node` and :func:`tagged_nodes`
take a case's nodes out of the scene without leaving their display and storage nodes behind.
Light to import (standard library only), like the rest of the panel's logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol


class PanelParameters(Protocol):
    """What the panel's state holds (the module's parameter node has these, and the volume nodes
    ``baseline<M>`` / ``followup<M>`` for each modality M of :data:`~RANOResponseLib.core.names.MODALITIES`)."""

    baselineFolder: Path
    followupFolder: Path
    bundle: Path
    roi: Any
    segmentation: bool  # Apply also segments and measures the tumour (off: predict's --no-segmentation)
    mapName: str
    opacity: float
    reviewDatabase: Path
    transform: Any
    gradcam: Any
    saliency: Any
    table: Any
    coursePatient: Path  # a patient folder (Patient-XXX/week-*) or a course CSV
    courseFolder: Path  # the timeline output folder (written by Run timeline, read by Load course)


@dataclass
class ShownResult:
    """The prediction the scene shows: the study folders it was made on and its scene nodes."""

    inputs: dict[str, Path]  # "baseline"/"followup" -> resolved study folder
    nodes: Any  # scene.SceneNodes


def given(path: Any) -> Optional[Path]:
    """A path parameter as a Path, or None when unset (the wrapper's unset Path is ``.``)."""
    return Path(path) if path is not None and str(path) not in ("", ".") else None


def remove_node(scene: Any, node: Any) -> None:
    """Remove a node with its display and storage nodes (``RemoveNode`` alone leaves them behind)."""
    if node is None or node.GetScene() is None:
        return
    extra = []
    for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"),
                          ("GetNthStorageNode", "GetNumberOfStorageNodes")):
        if hasattr(node, count):
            extra += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
    scene.RemoveNode(node)
    for n in extra:
        if n is not None and n.GetScene() is not None:
            scene.RemoveNode(n)


def tagged_nodes(scene: Any, attribute: str, values: tuple[str, ...] | None = None) -> list:
    """The scene's nodes that have ``attribute`` set (to one of ``values``, if given)."""
    found = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        value = node.GetAttribute(attribute)
        if value and (values is None or value in values):
            found.append(node)
    return found
