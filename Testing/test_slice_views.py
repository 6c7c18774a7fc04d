"""Offscreen pictures from Slicer's slice logic (RANOResponseLib.slice_views), real MRML.

Guards that a picture shows what a Slicer slice view shows: the heat overlay is visible where the
map is high and nowhere else, anatomy lands on the side its edge label says (radiological view:
patient right on the left, anterior/superior up), follow-up volumes are drawn through their
registration transform, and the PNGs are written top row first. slicer-core is a main dependency:
without it these tests fail at import, they are never skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import png_size
from RANOResponseLib.imaging.geometry import lps_to_ras
from RANOResponseLib.mrml.scene import (
    add_map_node,
    add_transform_node,
    image_to_node,
    new_scene,
    populate_scene,
    show_overlay,
)
from RANOResponseLib.mrml.slice_views import SliceRenderer, render_montage, render_slice_views, write_png

SIZE = 128


def _anatomy_and_blob(direction=None):
    """A 3 mm 'head' (smooth grey ellipsoid, background 0) and a 0..1 map whose blob sits to the
    patient's right, anterior and superior of the head's centre; returns (anatomy, map, blob LPS)."""
    n = (48, 56, 44)  # x, y, z
    z, y, x = np.mgrid[0:n[2], 0:n[1], 0:n[0]].astype(np.float32)
    c = (np.array(n) - 1) / 2
    r2 = ((x - c[0]) / 20) ** 2 + ((y - c[1]) / 24) ** 2 + ((z - c[2]) / 18) ** 2
    head = np.where(r2 < 1, 300 + 100 * np.cos(x / 3) * np.cos(y / 4), 0).astype(np.float32)
    anatomy = sitk.GetImageFromArray(head)
    anatomy.SetSpacing((3.0, 3.0, 3.0))
    anatomy.SetOrigin((-70.0, -80.0, -60.0))
    if direction is not None:
        anatomy = sitk.DICOMOrient(anatomy, direction)
    # LPS: right = -x, anterior = -y, superior = +z
    centre = np.array(anatomy.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in anatomy.GetSize()]))
    blob = centre + (-18.0, -24.0, 15.0)
    grid = sitk.Image(anatomy.GetSize(), sitk.sitkFloat32)
    grid.CopyInformation(anatomy)
    idx = np.array(grid.TransformPhysicalPointToContinuousIndex(blob.tolist()))
    src = sitk.GaussianSource(sitk.sitkFloat32, anatomy.GetSize(), sigma=[2.0] * 3, mean=idx.tolist(), scale=1.0,
                              origin=(0, 0, 0), spacing=(1, 1, 1))
    src.CopyInformation(anatomy)
    return anatomy, sitk.RescaleIntensity(src, 0.0, 1.0), blob


def _coloured(img: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (the heat overlay)."""
    rgb = img.astype(int)
    return (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) > 30


@pytest.fixture(params=["LPS", "RAI"])
def blob_scene(request):
    """Anatomy and map volumes (stored LPS, or flipped RAI order) with the map shown over it."""
    scene = new_scene()
    anatomy, heat, blob = _anatomy_and_blob(None if request.param == "LPS" else request.param)
    bg = image_to_node(scene, anatomy, "anatomy")
    fg = add_map_node(scene, heat, "heat", "gradcam")
    show_overlay(scene, bg, fg, opacity=0.6)
    return scene, bg, fg, blob


# Where the blob (patient right, anterior, superior) must appear, in Slicer's default views.
EXPECTED = {"Axial": ("left", "top", {"left": "R", "right": "L", "top": "A", "bottom": "P"}),
            "Coronal": ("left", "top", {"left": "R", "right": "L", "top": "S", "bottom": "I"}),
            "Sagittal": ("left", "top", {"left": "A", "right": "P", "top": "S", "bottom": "I"})}


@pytest.mark.parametrize("orientation", list(EXPECTED))
def test_overlay_visible_at_the_map_peak_and_on_the_right_side(blob_scene, orientation):
    """Through the blob, the overlay colours pixels at the blob (and only near it), on the side
    the edge labels name: patient right on the image left (radiological), anterior/superior up."""
    scene, bg, fg, blob = blob_scene
    with SliceRenderer(scene, SIZE) as r:
        plain = r.render(orientation, bg, None, center_ras=lps_to_ras(blob))
        over = r.render(orientation, bg, fg, 0.6, center_ras=lps_to_ras(blob), fit=False)
        labels = r.edge_labels()
    horizontal, vertical, expected_labels = EXPECTED[orientation]
    assert labels == expected_labels
    assert not _coloured(plain).any()  # the anatomy alone is grey
    hot = _coloured(over)
    assert 10 < hot.sum() < 0.1 * hot.size, hot.sum()
    rows, cols = np.nonzero(hot)
    cy, cx = rows.mean(), cols.mean()
    assert (cx < SIZE / 2) == (horizontal == "left"), (orientation, cx)
    assert (cy < SIZE / 2) == (vertical == "top"), (orientation, cy)
    # far from the blob the overlay leaves the anatomy exactly as it was
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    far = np.hypot(yy - cy, xx - cx) > SIZE / 4
    assert np.array_equal(over[far], plain[far])
    assert np.abs(over[hot].astype(int) - plain[hot]).max() > 40


def test_render_slice_views_files_and_defaults(blob_scene, tmp_path):
    """Folder: one labelled PNG per orientation, through the map's peak by default (the scene's
    Red view layers); a .png path: the three side by side."""
    scene, bg, fg, blob = blob_scene
    files = render_slice_views(scene, tmp_path / "views", size=SIZE)
    assert sorted(files) == ["axial", "coronal", "sagittal"]
    import matplotlib.image

    for o, path in files.items():
        assert path.name == f"slice_{o}.png" and png_size(path) == (SIZE, SIZE)
        img = (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.uint8)
        assert _coloured(img).sum() > 10, o  # the default slice passes through the map's peak
    strip = render_slice_views(scene, tmp_path / "strip.png", size=SIZE)
    assert set(strip.values()) == {tmp_path / "strip.png"}
    w, h = png_size(tmp_path / "strip.png")
    assert (w, h) == (3 * SIZE + 2 * 4, SIZE)
    # the private render view is gone again: only the scene's own three views remain
    views = scene.GetNodesByClass("vtkMRMLSliceNode")
    assert sorted(views.GetItemAsObject(i).GetLayoutName() for i in range(views.GetNumberOfItems())) == [
        "Green", "Red", "Yellow"]


def test_followup_is_drawn_through_its_transform(known_motion):
    """A follow-up volume under the registration transform is drawn on the baseline anatomy:
    its picture matches the baseline's far better than without the transform."""
    scene = new_scene()
    base = image_to_node(scene, known_motion.baseline.images["T1"], "baseline T1")
    fu = image_to_node(scene, known_motion.followup.images["T1"], "follow-up T1")
    tnode = add_transform_node(scene, known_motion.transform.GetInverse(), "reg")
    centre = lps_to_ras(known_motion.brain_points.mean(0))
    with SliceRenderer(scene, SIZE) as r:
        ref = r.render("Axial", base, center_ras=centre).astype(float)[..., 0]
        loose = r.render("Axial", fu, center_ras=centre, fit=False).astype(float)[..., 0]
        fu.SetAndObserveTransformNodeID(tnode.GetID())
        aligned = r.render("Axial", fu, center_ras=centre, fit=False).astype(float)[..., 0]
    err_aligned, err_loose = np.abs(aligned - ref).mean(), np.abs(loose - ref).mean()
    assert err_aligned < 0.5 * err_loose, (err_aligned, err_loose)


def test_write_png_is_top_row_first(tmp_path):
    """The array's first row is the PNG's top row (VTK images run bottom-up)."""
    img = np.zeros((20, 30, 3), np.uint8)
    img[:5, :10] = (255, 0, 0)  # red top-left corner
    path = write_png(img, tmp_path / "t.png")
    import matplotlib.image

    back = (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.uint8)
    assert np.array_equal(back, img)
    assert [p.name for p in tmp_path.iterdir()] == ["t.png"]


@pytest.mark.slow
def test_montage_of_a_prediction(case_pair, tiny_bundle, tmp_path):
    """The predict montage: baseline/follow-up CT1 and FLAIR columns, plain/Grad-CAM/saliency rows,
    overlay colour only in the map rows."""
    from RANOResponseLib.inference.pipeline import predict_pair

    result = predict_pair(case_pair.baseline, case_pair.followup, tiny_bundle, device="cpu")
    scene = new_scene()
    nodes = populate_scene(scene, result)
    path = render_montage(scene, nodes, tmp_path / "montage.png", "title line\nsecond line", size=SIZE)
    w, h = png_size(path)
    import matplotlib.image

    img = (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.uint8)
    assert img.shape[:2] == (h, w) and w > 4 * SIZE and h > 3 * SIZE
    head, pad = 70, 6
    rows = [img[head + i * (SIZE + pad):head + i * (SIZE + pad) + SIZE, 26:26 + 4 * (SIZE + pad)] for i in range(3)]
    # heat colours only: not the yellow edge letters (first column), not the cyan peak marks
    coloured = [(_coloured(r) & ~np.all(r == (0, 255, 255), axis=-1))[10:-10, SIZE:].sum() for r in rows]
    assert coloured[1] > 100 and coloured[2] > 0
    assert coloured[0] < 0.05 * coloured[1]
