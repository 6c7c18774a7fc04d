"""Model bundles: a folder with ``bundle.json`` and one or more ``state_dict`` weight files.

``bundle.json`` declares everything needed to run the weights on new studies: the architecture
and its arguments, the modalities and channel order, class names, model-grid spacing and size,
normalisation, the Grad-CAM layer, training provenance, CV metrics and each weight file's sha256.
Several weight files form an ensemble (e.g. the k fold models); predict averages them.
``input_statistics`` (optional) records what the training inputs looked like (brain volumes, slice
thickness, registration quality, intensities inside the brain; made by
:func:`RANOResponseLib.inference.guard.statistics`): predict's input guard compares each pair with it.
``calibration`` (optional) holds one temperature per ensemble member and the "uncertain" thresholds,
``suggestion`` (optional) a multinomial logistic regression as plain numbers (no pickle) that
combines the network's probabilities with the measured RANO category; both are fitted inside the
cross-validation folds on validation patients (:mod:`ResponseTrainingLib.analysis.calibration`)
and applied by :mod:`RANOResponseLib.inference.calibration`.

Weights are loaded with ``torch.load(..., weights_only=True)`` after their sha256 is checked:
a weights file never runs code and a corrupted or swapped file is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from RANOResponseLib.core.errors import BundleError
from RANOResponseLib.core.files import atomic_output_dir, write_text
from RANOResponseLib.core.names import CLASS_NAMES, MODALITIES
from RANOResponseLib.core.resources import find_resource
from RANOResponseLib.imaging.preprocessing import NORMALIZATIONS, Channel, InputSpec, is_tumour_channel

FORMAT = "rano-response-bundle"
FORMAT_VERSION = 1
DEFAULT_BUNDLE_ID = "rano-compact-phantom-v3"
BUNDLE_ENV = "RANO_RESPONSE_BUNDLE"


@dataclass
class Bundle:
    """A validated bundle description (weights not yet loaded)."""

    path: Path
    id: str
    architecture: dict[str, Any]
    spec: InputSpec
    class_names: tuple[str, ...]
    gradcam_layer: str
    weights: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return len(self.spec.channels)

    @property
    def input_statistics(self) -> dict[str, Any] | None:
        """What the training inputs looked like, or None for a bundle made without them."""
        return self.meta.get("input_statistics")

    @property
    def calibration(self) -> dict[str, Any] | None:
        """Per-member temperatures and the "uncertain" thresholds, or None (probabilities as the
        network gives them)."""
        return self.meta.get("calibration")

    @property
    def suggestion(self) -> dict[str, Any] | None:
        """The model of the suggested category (network + measured RANO), or None."""
        return self.meta.get("suggestion")


def sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def shipped_or_env(env_name: str, bundle_id: str) -> Path:
    """The folder named by the environment variable ``env_name``, else the bundle ``bundle_id``
    shipped in the extension's Resources/Models (the one rule for classifier and segmentation bundles)."""
    env = os.environ.get(env_name)
    return Path(env) if env else find_resource("Models", bundle_id)


def default_bundle_path() -> Path:
    """``$RANO_RESPONSE_BUNDLE``, else the bundle shipped in the extension's Resources/Models."""
    return shipped_or_env(BUNDLE_ENV, DEFAULT_BUNDLE_ID)


def require(cond: bool, where: Path, msg: str) -> None:
    """Raise :class:`BundleError` ``"<where>: <msg>"`` unless ``cond`` (bundle validation)."""
    if not cond:
        raise BundleError(f"{where}: {msg}")



def read_bundle(path: Path | str | None = None) -> Bundle:
    """Read and validate ``bundle.json`` (structure, consistency, weight files present)."""
    path = Path(path) if path else default_bundle_path()
    meta_file = path / "bundle.json" if path.is_dir() else path
    root = meta_file.parent
    require(meta_file.is_file(), meta_file, "model bundle not found (no bundle.json)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decoding errors
        raise BundleError(f"{meta_file}: not valid JSON ({e})") from None
    require(isinstance(meta, dict), meta_file, "top level must be an object")
    require(meta.get("format") == FORMAT, meta_file, f"'format' must be {FORMAT!r}")
    require(meta.get("format_version") == FORMAT_VERSION, meta_file,
            f"unsupported format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    for key in ("id", "architecture", "modalities", "channels", "class_names", "spacing_mm",
                "input_size", "normalization", "gradcam_layer", "weights"):
        require(key in meta, meta_file, f"missing key '{key}'")

    modalities = tuple(meta["modalities"])
    require(len(modalities) > 0 and set(modalities) <= set(MODALITIES) and len(set(modalities)) == len(modalities),
            meta_file, f"modalities {list(modalities)} must be distinct names from {list(MODALITIES)}")
    try:
        channels = tuple(Channel.parse(c) for c in meta["channels"])
    except (ValueError, TypeError, AttributeError) as e:
        raise BundleError(f"{meta_file}: {e}") from None
    require({c.modality for c in channels if not is_tumour_channel(c)} == set(modalities), meta_file,
            "channels must use exactly the declared modalities (and segmentation channels)")
    class_names = tuple(meta["class_names"])
    require(len(class_names) >= 2 and len(set(class_names)) == len(class_names), meta_file,
            "class_names must be at least two distinct names")
    spacing, size = meta["spacing_mm"], meta["input_size"]
    require(isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in spacing),
            meta_file, "spacing_mm must be three positive numbers (x, y, z)")
    require(isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s >= 16 for s in size),
            meta_file, "input_size must be three integers >= 16 (x, y, z)")
    norm = meta["normalization"]
    require(isinstance(norm, dict) and norm.get("method") in NORMALIZATIONS, meta_file,
            f"normalization.method must be one of {list(NORMALIZATIONS)}")
    stats = meta.get("input_statistics")
    require(stats is None or (isinstance(stats, dict) and isinstance(stats.get("version"), int)), meta_file,
            "input_statistics must be an object with an integer 'version'")
    arch = meta["architecture"]
    require(isinstance(arch, dict) and isinstance(arch.get("args"), dict), meta_file,
            "architecture must be an object with 'name' and 'args'")
    from RANOResponseLib.model.networks import ARCHITECTURES

    require(arch.get("name") in ARCHITECTURES, meta_file,
            f"unknown architecture {arch.get('name')!r} (known: {', '.join(ARCHITECTURES)})")
    args = arch["args"]
    require(args.get("in_channels") == len(channels), meta_file,
            f"architecture in_channels {args.get('in_channels')} != {len(channels)} declared channels")
    require(args.get("out_channels") == len(class_names), meta_file,
            f"architecture out_channels {args.get('out_channels')} != {len(class_names)} class names")
    weights = meta["weights"]
    require(isinstance(weights, list) and len(weights) > 0, meta_file, "weights must be a non-empty list")
    for w in weights:
        require(isinstance(w, dict) and "file" in w and "sha256" in w, meta_file,
                "each weights entry needs 'file' and 'sha256'")
        require((root / w["file"]).is_file(), root / w["file"], "weights file missing")
    if meta.get("calibration") is not None:
        _check_calibration(meta["calibration"], len(weights), meta_file)
    if meta.get("suggestion") is not None:
        _check_suggestion(meta["suggestion"], class_names, meta_file)

    spec = InputSpec(
        modalities=modalities,
        channels=channels,
        spacing=tuple(float(s) for s in spacing),
        size=tuple(int(s) for s in size),
        normalization=norm["method"],
        clip=float(norm.get("clip", 5.0)),
    )
    return Bundle(
        path=root,
        id=str(meta["id"]),
        architecture=arch,
        spec=spec,
        class_names=class_names,
        gradcam_layer=str(meta["gradcam_layer"]),
        weights=weights,
        meta=meta,
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_calibration(cal: Any, members: int, where: Path) -> None:
    """``calibration``: ``{"method": "temperature", "temperatures": [one > 0 per weights entry],
    "uncertain": {"top_probability_below": p in [0, 1], "spread_above": s >= 0 or null, "chosen_on": ...}}``."""
    require(isinstance(cal, dict) and cal.get("method") == "temperature", where,
            "calibration must be an object with method 'temperature'")
    temps = cal.get("temperatures")
    require(isinstance(temps, list) and len(temps) == members and all(_number(t) and t > 0 for t in temps),
            where, f"calibration.temperatures must be {members} positive numbers (one per weights entry)")
    unc = cal.get("uncertain")
    if unc is not None:
        require(isinstance(unc, dict), where, "calibration.uncertain must be an object")
        top, spread = unc.get("top_probability_below"), unc.get("spread_above")
        require(_number(top) and 0 <= top <= 1, where, "calibration.uncertain.top_probability_below must be in [0, 1]")
        require(spread is None or (_number(spread) and spread >= 0), where,
                "calibration.uncertain.spread_above must be a number >= 0 or null")


def _check_suggestion(sug: Any, class_names: Sequence[str], where: Path) -> None:
    """``suggestion``: a multinomial logistic regression on named features as numbers: ``classes``
    (the bundle's class names), ``features``, ``impute``/``mean``/``scale`` per feature, ``coef``
    (classes x features) and ``intercept`` (per class)."""
    require(isinstance(sug, dict) and sug.get("method") == "multinomial-logistic-regression", where,
            "suggestion must be an object with method 'multinomial-logistic-regression'")
    require(list(sug.get("classes", [])) == list(class_names), where,
            f"suggestion.classes must be the bundle's class names {list(class_names)}")
    feats = sug.get("features")
    require(isinstance(feats, list) and len(feats) > 0 and all(isinstance(f, str) for f in feats), where,
            "suggestion.features must be a non-empty list of names")
    n = len(feats)
    for key in ("impute", "mean", "scale"):
        v = sug.get(key)
        require(isinstance(v, list) and len(v) == n and all(_number(x) for x in v), where,
                f"suggestion.{key} must be {n} numbers (one per feature)")
    require(all(x > 0 for x in sug["scale"]), where, "suggestion.scale must be positive")
    coef, icpt = sug.get("coef"), sug.get("intercept")
    require(isinstance(coef, list) and len(coef) == len(class_names)
            and all(isinstance(r, list) and len(r) == n and all(_number(x) for x in r) for r in coef), where,
            f"suggestion.coef must be {len(class_names)} rows of {n} numbers")
    require(isinstance(icpt, list) and len(icpt) == len(class_names) and all(_number(x) for x in icpt), where,
            f"suggestion.intercept must be {len(class_names)} numbers")


_MODALITIES_CACHE: dict[str, tuple[int, tuple[str, ...]]] = {}  # bundle.json -> (mtime_ns, modalities)


def bundle_modalities(path: Path | str | None = None) -> tuple[str, ...]:
    """The modalities a bundle needs, read from its ``bundle.json`` only again when the file changes.

    For callers that ask often (the Slicer panel asks on every parameter change, slider drags
    included): a cache keyed on the file and its modification time, and no torch import.
    ``path``: a bundle folder or its bundle.json; empty or None: :func:`default_bundle_path`.
    Raises :class:`BundleError` for a missing file or an unusable modalities list.
    """
    path = Path(path) if path and str(path) not in ("", ".") else default_bundle_path()
    meta_file = path / "bundle.json" if path.is_dir() else path
    try:
        mtime = meta_file.stat().st_mtime_ns
    except OSError:
        raise BundleError(f"{meta_file}: model bundle not found (no bundle.json)") from None
    key = str(meta_file.resolve())
    cached = _MODALITIES_CACHE.get(key)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        modalities = json.loads(meta_file.read_text(encoding="utf-8"))["modalities"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{meta_file}: no readable 'modalities' ({e})") from None
    require(isinstance(modalities, list) and len(modalities) > 0 and set(modalities) <= set(MODALITIES)
            and len(set(modalities)) == len(modalities), meta_file,
            f"modalities {modalities!r} must be distinct names from {list(MODALITIES)}")
    _MODALITIES_CACHE[key] = (mtime, tuple(modalities))
    return tuple(modalities)


def load_models(bundle: Bundle, device: "Any" = "cpu") -> list["Any"]:
    """Verify each weight file's sha256, load it with ``weights_only=True`` and build the models."""
    import torch

    from RANOResponseLib.model.networks import build_network

    models = []
    for w in bundle.weights:
        f = bundle.path / w["file"]
        digest = sha256(f)
        if digest != w["sha256"]:
            raise BundleError(
                f"{f}: sha256 mismatch (bundle.json says {w['sha256'][:12]}..., file is {digest[:12]}...); "
                "the weights are corrupted or were replaced"
            )
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad bundle
            raise BundleError(f"{f}: cannot load weights ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BundleError(f"{f}: not a state_dict (expected a flat mapping of parameter names to tensors)")
        net = build_network(bundle.architecture["name"], **bundle.architecture["args"])
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0:2]
            raise BundleError(f"{f}: weights do not fit the declared architecture ({' '.join(first)})") from None
        models.append(net.to(device).eval())
    require(
        gradcam_layer_exists(models[0], bundle.gradcam_layer), bundle.path / "bundle.json",
        f"gradcam_layer {bundle.gradcam_layer!r} is not a module of the network",
    )
    return models


def gradcam_layer_exists(model: Any, name: str) -> bool:
    return name in dict(model.named_modules())


def write_bundle(
    out: Path | str,
    *,
    bundle_id: str,
    architecture: dict[str, Any],
    spec: InputSpec,
    state_dicts: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] = CLASS_NAMES,
    gradcam_layer: str | None = None,
    extra: Mapping[str, Any] | None = None,
    half: bool = True,
    model_card: str | None = None,
    input_statistics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle folder atomically (staged next to ``out``, then renamed into place).

    ``half`` stores floating-point tensors as float16 to keep the repository small; they are
    loaded back as float32. ``input_statistics``: what the training inputs looked like
    (:func:`RANOResponseLib.inference.guard.statistics`). ``gradcam_layer``: default, the
    architecture's (:data:`~RANOResponseLib.model.networks.GRADCAM_LAYERS`).
    """
    import torch

    from RANOResponseLib.model.networks import GRADCAM_LAYERS

    gradcam_layer = gradcam_layer or GRADCAM_LAYERS[architecture["name"]]
    out = Path(out)
    previous = [p.name for p in out.iterdir()] if out.is_dir() else []
    # staged, then moved in; whatever an earlier bundle left there (more ensemble members) goes
    with atomic_output_dir(out, owned=previous) as stage:
        weights = []
        for i, sd in enumerate(state_dicts):
            name = "weights.pt" if len(state_dicts) == 1 else f"weights-{i}.pt"
            tensors = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
                       for k, v in sd.items()}
            torch.save(tensors, stage / name)
            weights.append({"file": name, "sha256": sha256(stage / name),
                            "dtype": "float16" if half else "float32"})
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "id": bundle_id,
            "architecture": architecture,
            "modalities": list(spec.modalities),
            "channels": [str(c) for c in spec.channels],
            "class_names": list(class_names),
            "spacing_mm": list(spec.spacing),
            "input_size": list(spec.size),
            "normalization": {"method": spec.normalization, "mask": "brain", "clip": spec.clip},
            "gradcam_layer": gradcam_layer,
            "weights": weights,
        }
        meta.update(extra or {})
        if input_statistics is not None:
            meta["input_statistics"] = dict(input_statistics)
        (stage / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if model_card:
            (stage / "MODEL_CARD.md").write_text(model_card, encoding="utf-8")
    read_bundle(out)  # what we wrote must load
    return out


def set_input_statistics(path: Path | str, statistics: Mapping[str, Any]) -> Path:
    """Add (or replace) ``input_statistics`` in an existing bundle's ``bundle.json``.

    Only that key changes (the weights and their sha256 stay as they are); the file is rewritten
    atomically and the bundle is validated again. Returns the ``bundle.json`` path.
    """
    bundle = read_bundle(path)
    meta_file = bundle.path / "bundle.json"
    meta = dict(bundle.meta)
    meta["input_statistics"] = dict(statistics)
    write_text(json.dumps(meta, indent=2) + "\n", meta_file)
    read_bundle(meta_file)
    return meta_file
