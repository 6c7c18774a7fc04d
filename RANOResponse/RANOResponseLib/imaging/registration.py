"""Rigid registration of one image onto another (SimpleITK, Mattes mutual information)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.imaging.geometry import shrink_to
from RANOResponseLib.imaging.io import Study


@dataclass
class RegistrationParams:
    """Rigid Mattes-MI registration, multi-resolution, regular-step gradient descent.

    Follows ../shared/reference/EXPLAIN.md, with one change for speed: both images are first
    box-averaged (``BinShrink``) to about ``working_spacing_mm``, the model grid's resolution, and
    the pyramid runs on those (8/4/2 mm for a 1 mm brain). On a 1 mm phantom pair this takes
    1.7 s instead of 6.1 s on 2 cores, with the same 0.01 mm error.
    """

    working_spacing_mm: float = 2.0  # images are box-averaged to about this first (BinShrink)
    sampling: float = 0.05
    shrink: tuple[int, ...] = (4, 2, 1)
    sigmas_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    iterations: int = 200
    bins: int = 50
    seed: int = 20251
    modality_order: tuple[str, ...] = ("T1", "CT1", "T2", "FLAIR")


@dataclass
class RegistrationResult:
    transform: sitk.Euler3DTransform  # maps baseline (fixed) points to follow-up (moving) points
    modality: str
    metric: float
    iterations: int
    stop: str = ""

    def as_dict(self) -> dict:
        t = self.transform
        return {
            "modality": self.modality,
            "metric": self.metric,
            "iterations": self.iterations,
            "rotation_deg": [float(np.degrees(a)) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ())],
            "translation_mm": [float(v) for v in t.GetTranslation()],
            "center_mm": [float(v) for v in t.GetCenter()],
            "stop": self.stop,
        }


def brain_mask(image: sitk.Image) -> sitk.Image:
    """Non-zero voxels (the images are skull-stripped, background exactly 0)."""
    return sitk.Cast(sitk.NotEqual(image, 0.0), sitk.sitkUInt8)


def register_rigid(
    baseline: Study, followup: Study, params: RegistrationParams | None = None
) -> RegistrationResult:
    """Register the follow-up rigidly onto the baseline with SimpleITK.

    Uses the first modality of ``params.modality_order`` that both studies have (T1 first: it
    changes least with enhancement). Initialised at the centres of mass of the two heads.
    """
    params = params or RegistrationParams()
    common = [m for m in params.modality_order if m in baseline.images and m in followup.images]
    if not common:
        raise RANOInputError(f"{followup.folder}: no modality in common with {baseline.folder}")
    modality = common[0]
    fixed = shrink_to(baseline.images[modality], params.working_spacing_mm)
    moving = shrink_to(followup.images[modality], params.working_spacing_mm)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=params.bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(params.sampling, params.seed)
    reg.SetMetricFixedMask(brain_mask(fixed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-4,
        numberOfIterations=params.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(params.shrink))
    reg.SetSmoothingSigmasPerLevel(list(params.sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        out = reg.Execute(fixed, moving)
    except RuntimeError as e:
        raise RANOInputError(
            f"{followup.folder}: registration to {baseline.folder} failed "
            f"({str(e).strip().splitlines()[-1]}); are they the same patient?"
        ) from None
    transform = _as_euler(out)
    return RegistrationResult(
        transform=transform,
        modality=modality,
        metric=float(reg.GetMetricValue()),
        iterations=int(reg.GetOptimizerIteration()),
        stop=reg.GetOptimizerStopConditionDescription(),
    )


def _as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """Unwrap the composite SimpleITK returns into its single Euler3D transform."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        composite.FlattenTransform()
        transform = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    return sitk.Euler3DTransform(transform)
