"""The settings of a training run, and their defaults: defined here once.

:class:`TrainConfig`'s field defaults are the defaults of ``rano-response train`` (its argparse
reads them through :func:`default`) and of the Slicer module's widget (its parameter node reads
them too). :meth:`TrainConfig.argv` writes a configuration back as the command that reproduces it.

This module is imported when the Slicer module is loaded, before the user has been asked to
install torch, scikit-learn or SimpleITK: it imports only the standard library and
:mod:`RANOResponseLib.core`, and the heavier modules lazily inside the methods that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES

if TYPE_CHECKING:
    from RANOResponseLib.imaging.preprocessing import InputSpec

WEIGHTINGS = ("equal", "1-prevalence", "1/prevalence")
WEIGHTING_ALIASES = {"one-minus": "1-prevalence", "inverse": "1/prevalence"}
CHANNEL_SETS = ("stack", "difference", "stack+difference", "difference+segmentation", "stack+segmentation")
ARCHS = ("compact", "densenet121", "densenet169", "densenet264", "timm25d")
# settings that change the numbers: a resumed run must have the same ones
_RESULT_KEYS = ("data", "arch", "modalities", "channels", "pairing", "folds", "loocv", "val_fraction", "epochs",
                "batch_size", "lr", "weight_decay", "patience", "plateau_patience", "loss_weighting",
                "sampler_weighting", "seed", "spacing", "size", "dropout", "augment", "backbone", "slices",
                "slice_step", "pretrained_weights", "grad_shards", "seg_bundle")
_LATER_KEYS = ("seg_bundle",)
# fields that are not options of ``rano-response train`` (the command line itself)
_NOT_OPTIONS = ("command",)


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in ``summary.json`` and ``bundle.json``)."""

    data: Path
    out: Path
    arch: str = "compact"
    # All four sequences. The reference study's best run used T1+T2+FLAIR, but it chose that
    # among a grid on folds that were not grouped by patient and whose test fold also picked the
    # checkpoint; RANO itself is read on contrast-enhanced T1 (CT1), and the phantom's labels
    # come from its enhancing lesions. The shipped bundle (rano-compact-phantom-v3) uses all four.
    modalities: tuple[str, ...] = MODALITIES
    # stack: [follow-up, baseline] per modality; difference: follow-up - baseline; +segmentation:
    # the timepoints' automatic tumour labels as channels too (predict segments before the network)
    channels: str = "stack"
    seg_bundle: Path | None = None  # the segmentation behind +segmentation channels (default: shipped)
    pairing: str = "previous"
    labels: Path | None = None  # review export (rano-response review export): overrides/adds labels
    folds: int = 5
    loocv: bool = False
    val_fraction: float = 0.2
    # A cap, as in the reference study (max 100, patience 10): early stopping on the validation
    # patients and the plateau schedule end most runs well before it. (The shipped bundle was
    # trained with --epochs 18 --patience 8 to fit a CPU budget.)
    epochs: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 10
    plateau_patience: int = 4
    loss_weighting: str = "1/prevalence"
    sampler_weighting: str = "equal"
    seed: int = 0
    device: str = "auto"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (80, 96, 80)
    dropout: float = 0.1
    augment: bool = True
    clinical: bool = False
    hybrid: tuple[str, ...] = ()
    hybrid_fit: str = "val"
    backbone: str = "resnet18"  # timm25d only
    slices: int = 5  # timm25d only
    slice_step: int = 4  # timm25d only
    pretrained_weights: Path | None = None  # timm25d: local weights file for transfer learning
    grad_shards: int = 1
    only_fold: int | None = None
    preprocess_only: bool = False
    cache: Path | None = None  # default: <out>/cache
    bundle_id: str = "rano-response-model"
    resume: bool = False
    progress_json: bool = False
    # the command line as typed (set by the CLI); empty when the run was started from Python, in
    # which case the provenance records the equivalent command (:meth:`argv`)
    command: str = ""

    def spec(self) -> InputSpec:
        """The model input these settings describe (modalities, channels, grid)."""
        from RANOResponseLib.imaging.preprocessing import (
            InputSpec,
            default_channels,
            difference_channels,
            tumour_channels,
        )

        mods = tuple(self.modalities)
        chans = {"stack": default_channels(mods), "difference": difference_channels(mods),
                 "stack+difference": default_channels(mods) + difference_channels(mods),
                 "difference+segmentation": difference_channels(mods) + tumour_channels(),
                 "stack+segmentation": default_channels(mods) + tumour_channels()}[self.channels]
        return InputSpec(mods, tuple(chans), tuple(float(s) for s in self.spacing),
                         tuple(int(s) for s in self.size))

    def check(self) -> None:
        """Normalise aliases and refuse impossible settings with a one-line reason."""
        from ResponseTrainingLib.training.hybrid import CLASSIFIERS, HYBRID_FIT

        self.loss_weighting = WEIGHTING_ALIASES.get(self.loss_weighting, self.loss_weighting)
        self.sampler_weighting = WEIGHTING_ALIASES.get(self.sampler_weighting, self.sampler_weighting)
        for flag, v in (("--loss-weighting", self.loss_weighting), ("--sampler-weighting", self.sampler_weighting)):
            if v not in WEIGHTINGS:
                raise RANOInputError(f"{flag} {v}: use one of {', '.join(WEIGHTINGS)}")
        if self.arch not in ARCHS:
            raise RANOInputError(f"--arch {self.arch}: use one of {', '.join(ARCHS)}")
        if self.channels not in CHANNEL_SETS:
            raise RANOInputError(f"--channels {self.channels}: use one of {', '.join(CHANNEL_SETS)}")
        check_modalities(self.modalities)
        if not self.loocv and self.folds < 2:
            raise RANOInputError(f"--folds {self.folds}: need at least 2 (or --loocv)")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_shards < 1:
            raise RANOInputError("--epochs, --batch-size and --grad-shards must be at least 1")
        if self.batch_size % self.grad_shards:
            raise RANOInputError(f"--batch-size {self.batch_size} is not divisible by --grad-shards {self.grad_shards}")
        if not 0 < self.val_fraction < 0.5:
            raise RANOInputError(f"--val-fraction {self.val_fraction}: use a value between 0 and 0.5")
        unknown = [h for h in self.hybrid if h not in CLASSIFIERS]
        if unknown:
            raise RANOInputError(f"--hybrid {','.join(unknown)}: unknown (use {', '.join(CLASSIFIERS)})")
        if self.hybrid_fit not in HYBRID_FIT:
            raise RANOInputError(f"--hybrid-fit {self.hybrid_fit}: use one of {', '.join(HYBRID_FIT)}")
        if self.pretrained_weights is not None and not Path(self.pretrained_weights).is_file():
            raise RANOInputError(f"{self.pretrained_weights}: pretrained weights file not found")

    def result_key(self) -> str:
        """Hash of the settings that change the numbers (a resumed run must match it)."""
        d = asdict(self)
        # settings added later count only when set, so runs made before them still resume
        keys = [k for k in _RESULT_KEYS if not (k in _LATER_KEYS and d[k] is None)]
        blob = json.dumps({k: (str(d[k]) if isinstance(d[k], Path) else d[k]) for k in keys},
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def argv(self, path: Any = str) -> list[str]:
        """The ``rano-response train`` arguments that give this configuration: ``--data`` and
        ``--out``, then every option whose value differs from its default. Each option is its
        field's name with dashes (``batch_size`` -> ``--batch-size``); a flag that is on by
        default is turned off with ``--no-<name>``. ``path`` renders path values."""
        args: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _NOT_OPTIONS or (f.name not in ("data", "out") and value == default(f.name)):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif f.name in PATH_FIELDS:
                args += [flag, path(value)]
            elif isinstance(value, (tuple, list)):
                args += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
            else:
                args += [flag, str(value)]
        return args


# the settings that are paths (recorded by name only in a bundle: training.card.portable_path)
PATH_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig) if "Path" in str(f.type))


def check_modalities(modalities: tuple[str, ...]) -> None:
    """RANOInputError unless ``modalities`` are distinct names of :data:`MODALITIES` (at least one)."""
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities or len(set(modalities)) != len(modalities):
        raise RANOInputError(f"--modalities {','.join(modalities)}: use distinct names from {', '.join(MODALITIES)}")


def parse_modalities(text: str) -> tuple[str, ...]:
    """``"T1, T2,FLAIR"`` -> ``("T1", "T2", "FLAIR")``, checked by :func:`check_modalities`."""
    modalities = tuple(m.strip() for m in text.split(",") if m.strip())
    check_modalities(modalities)
    return modalities


def default(name: str) -> Any:
    """The default of :class:`TrainConfig` field ``name`` (a KeyError for fields without one)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    if f.default is dataclasses.MISSING:
        raise KeyError(f"TrainConfig.{name} has no default")
    return f.default
