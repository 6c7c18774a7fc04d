"""Segmentation bundles: the tumour segmentation network of one timepoint and how to run it.

Two kinds of folder are read by :func:`read_seg_bundle`:

* ``rano``: our own ``bundle.json`` (format :data:`SEG_FORMAT`) with the architecture (a MONAI
  SegResNet, DynUNet or UNet and its arguments), the input modalities in channel order, the
  model-grid spacing, the label names, training provenance and metrics, and one or more
  ``state_dict`` weight files with their sha256 (several = an ensemble, probabilities averaged).
  Written by :func:`write_seg_bundle` (ResponseTraining's ``train-seg``).
* ``monai``: a MONAI bundle folder as the model zoo ships it (``configs/inference.json`` with a
  ``network_def``, ``models/model.pt`` a state_dict), with a small label-mapping JSON
  (:data:`MAPPING_FILE` inside the folder, or any JSON file naming the folder) that says what
  the network takes and gives: input modalities in channel order, spacing, array layout, the
  activation (``softmax``: output channel k is label ``labels[k]``; ``sigmoid``: thresholded
  channels mapped to labels, e.g. brats_mri_segmentation's TC/WT/ET: ET -> 1, TC minus ET -> 2,
  WT minus TC -> 3) and optionally the sha256 of ``model.pt``. Nothing is ever downloaded.
  For the model zoo's ``brats_mri_segmentation`` (MSD Task01 channel order, 1 mm, RAS, z-scores
  over the non-zero voxels unclipped, sigmoid TC/WT/ET)::

      {"modalities": ["FLAIR", "T1", "CT1", "T2"], "spacing_mm": [1, 1, 1], "layout": "RAS",
       "normalization": {"method": "zscore", "clip": null}, "activation": "sigmoid", "threshold": 0.5,
       "channels": ["TC", "WT", "ET"],
       "mapping": [{"label": 1, "channels": ["ET"]}, {"label": 2, "channels": ["TC"], "minus": ["ET"]},
                   {"label": 3, "channels": ["WT"], "minus": ["TC"]}]}

  Optional keys: ``id``, ``bundle`` (the MONAI folder, relative to the JSON), ``config``
  (default ``configs/inference.json``), ``network_def`` (its key), ``model`` (default
  ``models/model.pt``), ``sha256``, ``label_names``; softmax networks give ``labels`` instead of
  ``channels``/``mapping`` (the label value of each output channel, 0 first).

Output labels are always LUMIERE/DeepBraTumIA's: 1 enhancing, 2 necrotic / non-enhancing
(including a resection cavity), 3 edema (:mod:`RANOResponseLib.core.names`).
Weights are loaded with ``torch.load(..., weights_only=True)`` after their sha256 is checked.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from RANOResponseLib.core.errors import BundleError
from RANOResponseLib.core.files import atomic_output_dir
from RANOResponseLib.core.names import LABEL_NAMES, MODALITIES
from RANOResponseLib.imaging.preprocessing import NORMALIZATIONS
from RANOResponseLib.model.bundle import require as _require
from RANOResponseLib.model.bundle import sha256, shipped_or_env

SEG_FORMAT = "rano-response-segmentation-bundle"
SEG_FORMAT_VERSION = 1
DEFAULT_SEG_BUNDLE_ID = "rano-seg-phantom-v1"
SEG_BUNDLE_ENV = "RANO_RESPONSE_SEG_BUNDLE"
MAPPING_FILE = "rano_labels.json"  # the label mapping of a MONAI bundle folder
MAPPING_FORMAT = "rano-response-label-mapping"
ACTIVATIONS = ("softmax", "sigmoid")
# How the network's arrays are laid out: "zyx" is ours (numpy (z, y, x) of an LPS grid);
# "RAS" is MONAI's after Orientationd(axcodes="RAS"): array axes (x, y, z), x towards the
# patient's right, y anterior, z superior (the zoo's bundles are trained that way).
LAYOUTS = ("zyx", "RAS")


def _monai_net(name: str) -> Callable[..., Any]:
    def build(**args: Any) -> Any:
        # imported when a network is built: `import monai` costs seconds, and reading a
        # bundle (the Slicer panel, the CLI's checks) must not pay them
        import monai.networks.nets as nets

        return getattr(nets, name)(**args)

    build.__name__ = name
    return build


SEG_ARCHITECTURES: dict[str, Callable[..., Any]] = {n: _monai_net(n) for n in ("SegResNet", "DynUNet", "UNet")}


def preload_networks() -> None:
    """Start importing MONAI (``import monai`` imports all of it: 5-10 s on 2 CPU cores) in a
    background thread, unless it is imported already, so that predict overlaps it with reading
    and registering the studies; building a network later waits for it (Python's import lock)."""
    if "monai.networks.nets" not in sys.modules:
        threading.Thread(target=importlib.import_module, args=("monai.networks.nets",), daemon=True,
                         name="import-monai").start()


@dataclass
class SegBundle:
    """A validated segmentation bundle (weights not yet loaded)."""

    path: Path
    id: str
    kind: str  # "rano" (our bundle.json) or "monai" (a MONAI bundle folder + label mapping JSON)
    architecture: dict[str, Any]  # {"name", "args"} (rano kind); {"network_def": ...} (monai kind)
    modalities: tuple[str, ...]  # input channel order
    spacing: tuple[float, float, float]  # model grid spacing (x, y, z) mm
    labels: tuple[int, ...]  # class k -> label value (0 = background)
    label_names: dict[int, str]
    weights: list[dict[str, Any]]  # [{"file", "sha256"}]; sha256 may be None for a MONAI bundle
    activation: str = "softmax"
    mapping: list[dict[str, Any]] = field(default_factory=list)  # sigmoid kind: channels -> labels
    meta: dict[str, Any] = field(default_factory=dict)  # bundle.json / the mapping JSON as read
    threshold: float = 0.5  # sigmoid kind
    layout: str = "zyx"  # see LAYOUTS
    normalization: str = "zscore"
    clip: float | None = 5.0  # z-scores clipped to +-clip (None: not clipped)

    @property
    def min_lesion_ml(self) -> float:
        """Enhancing components smaller than this are removed as noise (0: none)."""
        return float(self.meta.get("min_lesion_ml", 0.0) or 0.0)

    @property
    def sha256(self) -> list[str | None]:
        return [w.get("sha256") for w in self.weights]


def default_seg_bundle_path() -> Path:
    """``$RANO_RESPONSE_SEG_BUNDLE``, else the segmentation bundle shipped in Resources/Models."""
    return shipped_or_env(SEG_BUNDLE_ENV, DEFAULT_SEG_BUNDLE_ID)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    _require(path.is_file(), path, f"{what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decoding errors
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    _require(isinstance(data, dict), path, "top level must be an object")
    return data


def _modalities(value: Any, where: Path) -> tuple[str, ...]:
    ok = (isinstance(value, list) and len(value) > 0 and all(isinstance(m, str) for m in value)
          and set(value) <= set(MODALITIES) and len(set(value)) == len(value))
    _require(ok, where, f"modalities {value!r} must be distinct names from {list(MODALITIES)}")
    return tuple(value)


def _spacing(value: Any, where: Path) -> tuple[float, float, float]:
    ok = (isinstance(value, list) and len(value) == 3
          and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in value))
    _require(ok, where, "spacing_mm must be three positive numbers (x, y, z)")
    return tuple(float(s) for s in value)  # type: ignore[return-value]


def _label_names(value: Any, where: Path) -> dict[int, str]:
    try:
        names = {int(k): str(v) for k, v in (value or {}).items()}
    except (AttributeError, TypeError, ValueError):
        names = {}
    _require(bool(names) and set(names) <= set(LABEL_NAMES), where,
             f"label_names must map label values {sorted(LABEL_NAMES)} to names")
    return names


def _normalization(meta: Mapping[str, Any], where: Path) -> tuple[str, float | None]:
    norm = meta.get("normalization", {"method": "zscore", "clip": 5.0})
    _require(isinstance(norm, dict) and norm.get("method", "zscore") in NORMALIZATIONS, where,
             f"normalization.method must be one of {list(NORMALIZATIONS)}")
    clip = norm.get("clip", 5.0)
    _require(clip is None or (isinstance(clip, (int, float)) and clip > 0), where,
             "normalization.clip must be a positive number or null")
    return str(norm.get("method", "zscore")), None if clip is None else float(clip)


def read_seg_bundle(path: Path | str | None = None) -> SegBundle:
    """Read and validate a segmentation bundle (see the module docstring for the two kinds).

    ``path``: our bundle folder or its ``bundle.json``; a MONAI bundle folder holding
    :data:`MAPPING_FILE`; or a label-mapping JSON file (its ``"bundle"`` names the MONAI bundle
    folder, relative to the JSON file; default: the folder the JSON is in). None:
    :func:`default_seg_bundle_path`. Raises :class:`BundleError` naming the file at fault.
    """
    path = Path(path) if path else default_seg_bundle_path()
    if path.is_dir():
        if (path / "bundle.json").is_file():
            return _read_rano(path / "bundle.json")
        if (path / MAPPING_FILE).is_file():
            return _read_monai(path / MAPPING_FILE)
        if (path / "configs").is_dir():
            raise BundleError(f"{path / MAPPING_FILE}: a MONAI bundle needs a label mapping JSON (not found)")
        raise BundleError(f"{path / 'bundle.json'}: segmentation bundle not found (no bundle.json or {MAPPING_FILE})")
    _require(path.is_file(), path, "segmentation bundle not found")
    meta = _read_json(path, "bundle file")
    if meta.get("format") == SEG_FORMAT or path.name == "bundle.json":
        return _read_rano(path)
    return _read_monai(path)


def _read_rano(meta_file: Path) -> SegBundle:
    root = meta_file.parent
    meta = _read_json(meta_file, "segmentation bundle (bundle.json)")
    _require(meta.get("format") == SEG_FORMAT, meta_file, f"'format' must be {SEG_FORMAT!r}")
    _require(meta.get("format_version") == SEG_FORMAT_VERSION, meta_file,
             f"unsupported format_version {meta.get('format_version')!r} (expected {SEG_FORMAT_VERSION})")
    for key in ("id", "architecture", "modalities", "spacing_mm", "label_names", "weights"):
        _require(key in meta, meta_file, f"missing key '{key}'")
    modalities = _modalities(meta["modalities"], meta_file)
    names = _label_names(meta["label_names"], meta_file)
    arch = meta["architecture"]
    _require(isinstance(arch, dict) and isinstance(arch.get("args"), dict), meta_file,
             "architecture must be an object with 'name' and 'args'")
    _require(arch.get("name") in SEG_ARCHITECTURES, meta_file,
             f"unknown architecture {arch.get('name')!r} (known: {', '.join(SEG_ARCHITECTURES)})")
    labels = tuple(int(v) for v in meta.get("labels", [0, *sorted(names)]))
    _require(labels[:1] == (0,) and len(set(labels)) == len(labels) and set(labels[1:]) == set(names), meta_file,
             "labels must be 0 (background) followed by each named label once")
    args = arch["args"]
    _require(args.get("in_channels") == len(modalities), meta_file,
             f"architecture in_channels {args.get('in_channels')} != {len(modalities)} modalities")
    _require(args.get("out_channels") == len(labels), meta_file,
             f"architecture out_channels {args.get('out_channels')} != {len(labels)} labels (background included)")
    weights = meta["weights"]
    _require(isinstance(weights, list) and len(weights) > 0, meta_file, "weights must be a non-empty list")
    for w in weights:
        _require(isinstance(w, dict) and isinstance(w.get("file"), str) and isinstance(w.get("sha256"), str),
                 meta_file, "each weights entry needs 'file' and 'sha256'")
        _require((root / w["file"]).is_file(), root / w["file"], "weights file missing")
    method, clip = _normalization(meta, meta_file)
    return SegBundle(path=root, id=str(meta["id"]), kind="rano", architecture=arch, modalities=modalities,
                     spacing=_spacing(meta["spacing_mm"], meta_file), labels=labels, label_names=names,
                     weights=[dict(w) for w in weights], activation="softmax", meta=meta,
                     normalization=method, clip=clip)


def _read_monai(mapping_file: Path) -> SegBundle:
    m = _read_json(mapping_file, "label mapping")
    _require(m.get("format", MAPPING_FORMAT) == MAPPING_FORMAT, mapping_file, f"'format' must be {MAPPING_FORMAT!r}")
    root = (mapping_file.parent / str(m.get("bundle", "."))).resolve()
    config = root / str(m.get("config", "configs/inference.json"))
    model = root / str(m.get("model", "models/model.pt"))
    _require(config.is_file(), config, "MONAI bundle config not found")
    _require(model.is_file(), model, "MONAI bundle weights not found")
    for key in ("modalities", "spacing_mm", "activation"):
        _require(key in m, mapping_file, f"missing key '{key}'")
    modalities = _modalities(m["modalities"], mapping_file)
    activation = m["activation"]
    _require(activation in ACTIVATIONS, mapping_file, f"activation must be one of {list(ACTIVATIONS)}")
    names = _label_names(m.get("label_names", LABEL_NAMES), mapping_file)
    layout = m.get("layout", "RAS")
    _require(layout in LAYOUTS, mapping_file, f"layout must be one of {list(LAYOUTS)}")
    threshold = m.get("threshold", 0.5)
    _require(isinstance(threshold, (int, float)) and 0 < threshold < 1, mapping_file, "threshold must lie in (0, 1)")
    digest = m.get("sha256")
    _require(digest is None or (isinstance(digest, str) and len(digest) == 64), mapping_file,
             "sha256 must be the 64 hex digits of the weights file")
    mapping: list[dict[str, Any]] = []
    if activation == "softmax":
        labels = m.get("labels")
        _require(isinstance(labels, list) and labels[:1] == [0] and all(isinstance(v, int) for v in labels)
                 and set(labels[1:]) <= set(names) and len(set(labels)) == len(labels), mapping_file,
                 "softmax: 'labels' must give, per output channel, its label value (0 first, for background)")
        labels = tuple(labels)
        out_channels = len(labels)
    else:
        mapping, out_channels = _sigmoid_mapping(m, names, mapping_file)
        labels = (0, *(e["label"] for e in mapping))
    method, clip = _normalization(m, mapping_file)
    network_def = _network_def(config, str(m.get("network_def", "network_def")))
    return SegBundle(path=root, id=str(m.get("id", root.name)), kind="monai",
                     architecture={"config": str(config), "network_def": network_def, "out_channels": out_channels},
                     modalities=modalities, spacing=_spacing(m["spacing_mm"], mapping_file), labels=labels,
                     label_names=names, weights=[{"file": str(model.relative_to(root)), "sha256": digest}],
                     activation=activation, mapping=mapping, meta={**m, "mapping_file": str(mapping_file)},
                     threshold=float(threshold), layout=layout, normalization=method, clip=clip)


def _sigmoid_mapping(m: Mapping[str, Any], names: Mapping[int, str],
                     where: Path) -> tuple[list[dict[str, Any]], int]:
    """``[{"label", "channels": [k...], "minus": [k...]}]`` with channel names resolved to indices.

    A voxel takes the label of the first entry whose ``channels`` are all above the threshold and
    whose ``minus`` channels are all below it.
    """
    channel_names = m.get("channels", [])
    _require(isinstance(channel_names, list) and all(isinstance(c, str) for c in channel_names), where,
             "channels must be a list of output channel names")
    n = len(channel_names)

    def index(c: Any) -> int:
        if isinstance(c, str) and c in channel_names:
            return channel_names.index(c)
        _require(isinstance(c, int) and not isinstance(c, bool) and 0 <= c and (n == 0 or c < n), where,
                 f"mapping refers to unknown output channel {c!r} (channels: {channel_names})")
        return int(c)

    raw = m.get("mapping")
    _require(isinstance(raw, list) and len(raw) > 0, where, "sigmoid: 'mapping' must be a non-empty list")
    mapping = []
    for e in raw:
        _require(isinstance(e, dict) and e.get("label") in names and isinstance(e.get("channels"), list)
                 and e["channels"], where,
                 f"each mapping entry needs a 'label' (one of {sorted(names)}) and a non-empty 'channels' list")
        mapping.append({"label": int(e["label"]), "channels": [index(c) for c in e["channels"]],
                        "minus": [index(c) for c in e.get("minus", [])]})
    _require(len({e["label"] for e in mapping}) == len(mapping), where, "each label may be mapped once")
    used = max(max(e["channels"] + e["minus"]) for e in mapping) + 1
    return mapping, max(n, used)


# ``_target_``s a network_def may name. ConfigParser instantiates any importable callable and
# evaluates "$" expressions with eval(): a network definition from a downloaded folder could
# otherwise run arbitrary code (or download something: torch.hub.load). Networks are built from
# MONAI's and torch's network modules only, and expressions are refused.
_ALLOWED_TARGETS = ("monai.networks.", "torch.nn.")


def _network_def(config: Path, key: str) -> dict[str, Any]:
    """The ``network_def`` of a MONAI bundle config, with every ``@`` reference it uses inlined,
    checked to build only MONAI or torch network modules (see :data:`_ALLOWED_TARGETS`)."""
    cfg = _read_json(config, "MONAI bundle config")
    _require(key in cfg, config, f"no '{key}' in the config")

    def check(value: Any, trail: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "_target_":
                    v = _target(v, config)
                elif k in ("_mode_", "_requires_"):
                    raise BundleError(f"{config}: {key}: '{k}' is not allowed in a network definition")
                out[k] = check(v, trail)
            return out
        if isinstance(value, list):
            return [check(v, trail) for v in value]
        if isinstance(value, str) and value.startswith("$"):
            raise BundleError(f"{config}: {key}: expressions ({value[:40]!r}) are not allowed; "
                              "they would run code from the bundle")
        if isinstance(value, str) and value.startswith("@"):
            ref = value[1:]
            parts = ref.replace("::", "#").split("#")
            _require(ref not in trail and parts[0] in cfg, config, f"{key}: unresolvable reference {value!r}")
            target: Any = cfg
            for p in parts:
                try:
                    target = target[int(p)] if isinstance(target, list) else target[p]
                except (KeyError, IndexError, ValueError):
                    raise BundleError(f"{config}: {key}: unresolvable reference {value!r}") from None
            return check(target, (*trail, ref))
        return value

    net = check(cfg[key], (key,))
    _require(isinstance(net, dict) and "_target_" in net, config, f"'{key}' must be an object with a '_target_'")
    return net


def _target(name: Any, config: Path) -> str:
    """A ``_target_`` as a full dotted name under :data:`_ALLOWED_TARGETS`; a bare name (the zoo
    writes ``"SegResNet"``) is taken as ``monai.networks.nets.<name>``."""
    _require(isinstance(name, str) and name.replace(".", "").replace("_", "").isalnum(), config,
             f"_target_ {name!r} is not a class name")
    full = name if "." in name else f"monai.networks.nets.{name}"
    _require(full.startswith(_ALLOWED_TARGETS), config,
             f"_target_ {name!r} is not a MONAI or torch network module (allowed: "
             f"{', '.join(p + '*' for p in _ALLOWED_TARGETS)}, or a bare monai.networks.nets name)")
    return full


def build_seg_network(architecture: Mapping[str, Any]) -> Any:
    """The untrained network of a bundle's ``architecture``: ``{"name", "args"}`` (one of
    :data:`SEG_ARCHITECTURES`) or a checked MONAI ``network_def`` (instantiated with
    ``monai.bundle.ConfigParser``; nothing is downloaded)."""
    import torch

    if "network_def" in architecture:
        from monai.bundle import ConfigParser

        parser = ConfigParser({"network_def": architecture["network_def"]})
        net = parser.get_parsed_content("network_def", instantiate=True)
        if not isinstance(net, torch.nn.Module):
            raise BundleError(f"{architecture.get('config')}: network_def did not build a torch module")
        return net
    name = architecture.get("name")
    if name not in SEG_ARCHITECTURES:
        raise BundleError(f"unknown segmentation architecture {name!r} (known: {', '.join(SEG_ARCHITECTURES)})")
    return SEG_ARCHITECTURES[name](**architecture["args"])


def _state_dict(obj: Any, where: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, dict) and set(obj) >= {"model"} and isinstance(obj["model"], dict):
        obj = obj["model"]  # a MONAI CheckpointSaver file: {"model": state_dict, ...}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BundleError(f"{where}: not a state_dict (expected a mapping of parameter names to tensors)")
    return obj


def load_seg_models(bundle: SegBundle, device: Any = "cpu") -> list[Any]:
    """Check each weight file's sha256 (where the bundle records one), load it with
    ``weights_only=True`` into the bundle's network and return the models in eval mode."""
    import torch

    models = []
    for w in bundle.weights:
        f = bundle.path / w["file"]
        if w.get("sha256"):
            digest = sha256(f)
            if digest != w["sha256"]:
                raise BundleError(f"{f}: sha256 mismatch (bundle says {w['sha256'][:12]}..., file is {digest[:12]}...); "
                                  "the weights are corrupted or were replaced")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad bundle
            raise BundleError(f"{f}: cannot load weights ({type(e).__name__}: {e})") from None
        state = _state_dict(state, f)
        try:
            net = build_seg_network(bundle.architecture)
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - a network_def or args the constructor refuses
            raise BundleError(f"{bundle.path}: cannot build the network ({type(e).__name__}: {e})") from None
        try:
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).strip().splitlines()[0:2])
            raise BundleError(f"{f}: weights do not fit the declared network ({first})") from None
        models.append(net.to(device).eval())
    return models


def write_seg_bundle(
    out: Path | str,
    state_dicts: Sequence[Mapping[str, Any]],
    architecture: Mapping[str, Any],
    modalities: Sequence[str],
    spacing: Sequence[float],
    label_names: Mapping[int, str],
    provenance: Mapping[str, Any],
    metrics: Mapping[str, Any],
    card: str,
    meta: Mapping[str, Any] | None = None,
    half: bool = True,
) -> Path:
    """Write a segmentation bundle folder atomically: ``bundle.json``, ``weights-<k>.pt`` (one per
    ensemble member, sha256 recorded) and ``MODEL_CARD.md``.

    ``meta``: further top-level keys of ``bundle.json`` (``id`` (default: the folder's name),
    ``min_lesion_ml``, ``normalization``...). ``half`` stores floating-point tensors as float16
    (the repository stays small); they are loaded back as float32. The bundle written is read
    back with :func:`read_seg_bundle` before this returns.
    """
    import torch

    out = Path(out)
    extra = dict(meta or {})
    names = {int(k): str(v) for k, v in label_names.items()}
    previous = [p.name for p in out.iterdir()] if out.is_dir() else []
    with atomic_output_dir(out, owned=previous) as stage:
        weights = []
        for i, sd in enumerate(state_dicts):
            name = f"weights-{i}.pt"
            tensors = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
                       for k, v in sd.items()}
            torch.save(tensors, stage / name)
            weights.append({"file": name, "sha256": sha256(stage / name), "dtype": "float16" if half else "float32"})
        doc: dict[str, Any] = {
            "format": SEG_FORMAT,
            "format_version": SEG_FORMAT_VERSION,
            "id": str(extra.pop("id", out.name)),
            "architecture": dict(architecture),
            "modalities": list(modalities),
            "spacing_mm": [float(s) for s in spacing],
            "labels": [0, *sorted(names)],
            "label_names": {str(k): v for k, v in sorted(names.items())},
            "normalization": {"method": "zscore", "mask": "brain", "clip": 5.0},
            "weights": weights,
            "provenance": dict(provenance),
            "metrics": dict(metrics),
        }
        doc.update(extra)
        (stage / "bundle.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        (stage / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    read_seg_bundle(out)  # what we wrote must read back
    return out
