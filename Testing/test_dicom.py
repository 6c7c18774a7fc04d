"""DICOM study folders: listing, assignment to CT1/T1/T2/FLAIR, refusals, geometry, predict.

The DICOM series are written by :func:`RANOResponseLib.phantom.dicom_export.write_series` from the
4 mm phantom studies of ``case_pair`` (NIfTI), so every image read back has a known truth: the NIfTI
it was made from (geometry within 1e-3 mm, voxels equal after the rescale). The expected series
assignments below are written out by hand from the tags, not taken from the rules under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from RANOResponseCLI import main as cli_main
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.names import MODALITIES
from RANOResponseLib.imaging import dicom
from RANOResponseLib.imaging.io import read_image, read_study
from RANOResponseLib.imaging.studies import check_pair, describe_sources, load_study, missing_modalities
from RANOResponseLib.phantom.dicom_export import write_series

# What a site's scanner might call the four sequences (Siemens/GE style), with their parameters.
SPECS = {
    "CT1": dict(description="AX T1 POST GD", protocol="AX T1 SE", tr=550, te=12, contrast="GADAVIST"),
    "T1": dict(description="AX T1 PRE", protocol="AX T1 SE", tr=550, te=12),
    "T2": dict(description="t2_tse_tra", protocol="t2_tse_tra", tr=5000, te=95),
    "FLAIR": dict(description="t2_tirm_tra_dark-fluid", protocol="t2_tirm_tra_dark-fluid", tr=9000, te=85, ti=2500),
}
GEOMETRY_TOL_MM = 1e-3


@pytest.fixture(scope="module")
def sources(case_pair):
    """The NIfTI studies the DICOM series are made from: (baseline, follow-up) Study."""
    return read_study(case_pair.baseline), read_study(case_pair.followup)


def write_study(root: Path, images, *, patient_id: str = "P-001", study_uid: str = "1.2.826.0.1.99.1",
                specs=SPECS, folders=None, per_series=None) -> dict[str, str]:
    """Write one series per entry of ``specs`` (shuffled file names), series number 2, 3, ... in
    ``root/DICOM/0002``, ``0003``...; returns modality -> SeriesInstanceUID (``<study_uid>.<number>``).

    ``folders``: modality -> another sub-folder of ``root``; ``per_series``: modality -> more
    ``write_series`` arguments (a fault, another patient...)."""
    uids = {}
    for number, (m, spec) in enumerate(specs.items(), start=2):
        folder = root / (folders or {}).get(m, f"DICOM/{number:04d}")
        uid = f"{study_uid}.{number}"
        kwargs = {"patient_id": patient_id, "study_uid": study_uid, **spec, **(per_series or {}).get(m, {})}
        write_series(images[m], folder, series_uid=uid, series_number=number, shuffle_names=True, **kwargs)
        uids[m] = uid
    return uids


def assert_same_image(read: sitk.Image, truth: sitk.Image, atol: float = 0.0) -> None:
    """Same origin, spacing, direction (1e-3 mm) and voxels."""
    assert read.GetSize() == truth.GetSize()
    np.testing.assert_allclose(read.GetOrigin(), truth.GetOrigin(), atol=GEOMETRY_TOL_MM)
    np.testing.assert_allclose(read.GetSpacing(), truth.GetSpacing(), atol=GEOMETRY_TOL_MM)
    # a direction error of 1e-5 moves a point 100 mm away by 1e-3 mm
    np.testing.assert_allclose(read.GetDirection(), truth.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(truth), atol=atol, rtol=0)


def one_line_error(excinfo, folder: Path, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert str(folder) in message, f"{folder} not named in {message!r}"
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------------- listing


def test_lists_series_in_nested_folders_with_shuffled_names(tmp_path, sources):
    """Any file names, nested folders, two series in one folder, one series split over two
    folders, a localizer, a diffusion series and non-DICOM files: every series is listed once
    with all its files, and each modality gets its own series, read back exactly."""
    base, _ = sources
    root = tmp_path / "study"
    uids = write_study(root, base.images, folders={"CT1": "CD/IMAGES", "T1": "CD/IMAGES",
                                                  "T2": "CD/a/b/c", "FLAIR": "CD/f1"})
    flair = sorted((root / "CD/f1").iterdir())
    (root / "CD/f2").mkdir()
    for f in flair[::2]:  # every other FLAIR slice in a second folder (CDs cap files per folder)
        f.rename(root / "CD/f2" / f.name)
    small = sitk.RegionOfInterest(base.images["T1"], [base.images["T1"].GetSize()[0], 40, 3], [0, 0, 20])
    write_series(small, root / "CD/a/b/c", description="localizer", protocol="AAHScout", tr=8, te=4,
                 patient_id="P-001", study_uid="1.2.826.0.1.99.1", series_uid="9.1", series_number=1,
                 extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    write_series(base.images["T2"], root / "CD/a/b/c", description="ep2d_diff_3scan_trace_p2",
                 protocol="ep2d_diff", tr=6000, te=90, patient_id="P-001", study_uid="1.2.826.0.1.99.1",
                 series_uid="9.2", series_number=9, shuffle_names=True)
    (root / "CD/README.TXT").write_text("exported by PACS\n")
    (root / "CD/IMAGES/.DS_Store").write_bytes(b"\0\1\2")

    nz = base.images["CT1"].GetSize()[2]
    found = {s.uid: s for s in dicom.list_series(root)}
    assert set(found) == {*uids.values(), "9.1", "9.2"}
    assert {m: len(found[u].files) for m, u in uids.items()} == {m: nz for m in MODALITIES}
    assert len(found["9.1"].files) == 3
    assert {p.parent.name for p in found[uids["FLAIR"]].files} == {"f1", "f2"}

    study = load_study(root)
    assert study.patient == {"PatientID": "P-001", "StudyInstanceUID": "1.2.826.0.1.99.1", "StudyDate": "20240101"}
    for m in MODALITIES:
        assert study.sources[m]["series_uid"] == uids[m]
        assert study.sources[m]["kind"] == "dicom" and study.sources[m]["path"] == str(root)
        assert study.sources[m]["description"] == SPECS[m]["description"]
        assert study.sources[m]["spacing"] == [4.0, 4.0, 4.0] and study.sources[m]["slice_thickness"] == 4.0
        assert_same_image(study.images[m], base.images[m])
    assert study.files == {}  # no single file holds a DICOM series
    # what a source names is enough to read the same image again (predict's Slicer scene does)
    again = load_study(study.sources["FLAIR"]["path"], ["FLAIR"], series={"FLAIR": uids["FLAIR"]})
    assert_same_image(again.images["FLAIR"], base.images["FLAIR"])
    text = describe_sources(study)
    for m in MODALITIES:
        assert f"{m:<5} <- '{SPECS[m]['description']}'" in text and uids[m] in text
    assert text.count("4.00 x 4.00 x 4.00 mm") == 4


def test_cd_layout_with_dicomdir(tmp_path, sources, capfd):
    """A CD export (a DICOMDIR index, files named by pydicom's File-set writer in nested folders)
    loads like any folder, and nothing is printed (ITK's warnings stay off stderr)."""
    from pydicom.fileset import FileSet

    base, _ = sources
    uids = write_study(tmp_path / "export", base.images)
    cd = tmp_path / "cd"
    cd.mkdir()
    fileset = FileSet()
    for path in sorted((tmp_path / "export").rglob("*")):
        if path.is_file():
            fileset.add(path)
    fileset.write(cd)
    assert (cd / "DICOMDIR").is_file()
    study = load_study(cd)
    assert {m: s["series_uid"] for m, s in study.sources.items()} == uids
    for m in MODALITIES:
        assert_same_image(study.images[m], base.images[m])
    assert capfd.readouterr().err == ""


def test_nifti_folder_is_read_as_before(case_pair, sources):
    """A folder of modality files goes through read_study; its sources say so; no patient."""
    study = load_study(case_pair.baseline)
    assert study.patient == {}
    for m in MODALITIES:
        assert study.sources[m]["kind"] == "nifti"
        assert Path(study.sources[m]["path"]) == study.files[m]
        assert study.sources[m]["spacing"] == [4.0, 4.0, 4.0]
        assert_same_image(study.images[m], sources[0].images[m])


# ---------------------------------------------------------------------------------- geometry


def _decoded(files) -> np.ndarray:
    """Stored values * RescaleSlope + RescaleIntercept of each file, decoded by pydicom, in slice order."""
    datasets = [pydicom.dcmread(f) for f in files]
    normal = np.cross(*np.reshape(np.array(datasets[0].ImageOrientationPatient, float), (2, 3)))
    datasets.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])


def test_oblique_thick_float_series_round_trip(tmp_path, sources):
    """An oblique 2 x 2 x 5 mm float image (non-integer values) written as DICOM reads back with the
    geometry of the NIfTI it was made from and the voxels the files store after rescaling."""
    base, _ = sources
    rotation = sitk.Euler3DTransform((0, 0, 0), np.radians(15.0), np.radians(-10.0), np.radians(25.0))
    grid = sitk.Image([90, 100, 30], sitk.sitkFloat32)
    grid.SetSpacing([2.0, 2.0, 5.0])
    grid.SetDirection(rotation.GetMatrix())
    centre = np.array(base.images["FLAIR"].TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in base.images["FLAIR"].GetSize()]))
    half = np.array(rotation.GetMatrix()).reshape(3, 3) @ (np.array([89, 99, 29]) * [2.0, 2.0, 5.0] / 2)
    grid.SetOrigin((centre - half).tolist())
    oblique = sitk.Resample(base.images["FLAIR"], grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    oblique = oblique * 0.37 + 0.125  # non-integer values: a rescale slope is needed
    nifti = tmp_path / "FLAIR.nii.gz"
    sitk.WriteImage(oblique, str(nifti))
    truth = read_image(nifti)

    files = write_series(truth, tmp_path / "dicom", description="FLAIR", protocol="FLAIR", tr=9000, te=85,
                         ti=2500, patient_id="P", study_uid="1.2.3", shuffle_names=True)
    (series,) = dicom.list_series(tmp_path / "dicom")
    image, geometry = dicom.read_series(series)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert_same_image(image, truth, atol=slope / 2 + 1e-4)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(image), _decoded(files), atol=1e-3, rtol=0)
    assert geometry.thickness == pytest.approx(5.0) and geometry.spacing == pytest.approx(5.0)


def test_left_handed_storage_reads_the_same_anatomy(tmp_path, sources):
    """A volume stored with its slice axis against row x column (left-handed, as some NIfTI are)
    becomes a right-handed image of the same voxels at the same physical points."""
    base, _ = sources
    flipped = sitk.Flip(base.images["T2"], [False, False, True], flipAboutOrigin=False)
    d = np.array(flipped.GetDirection()).reshape(3, 3)
    assert np.linalg.det(d) < 0
    write_series(flipped, tmp_path / "dicom", description="T2", protocol="T2", tr=5000, te=95,
                 patient_id="P", study_uid="1.2.3")
    (series,) = dicom.list_series(tmp_path / "dicom")
    image, _ = dicom.read_series(series)
    assert np.linalg.det(np.array(image.GetDirection()).reshape(3, 3)) > 0
    back = sitk.Resample(image, flipped, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(flipped))


# ---------------------------------------------------------------------------- classification


def _series(description: str, protocol: str = "", *, tr=None, te=None, ti=None, agent: str = "",
            image_type: str = "ORIGINAL\\PRIMARY\\M\\ND", modality: str = "MR", sequence: str = "SE") -> dicom.Series:
    return dicom.Series(uid="1.2.3", files=(Path("x"),), description=description, protocol=protocol,
                        dicom_modality=modality, image_type=image_type, sequence=sequence, tr=tr, te=te, ti=ti,
                        contrast_agent=agent, patient_id="P", study_uid="1.2", study_date="", series_number=1,
                        frames=1)


# (series, the modality a radiologist would assign, or None: not one of the four)
CLASSIFIED = [
    (_series("AX T1 POST GD", tr=550, te=12), "CT1"),
    (_series("t1_mprage_sag_p2_iso", "t1_mprage_sag_p2_iso", tr=2300, te=2.3, ti=900, sequence="GR\\IR"), "T1"),
    (_series("t1_mprage_sag_p2_iso_KM", "t1_mprage_sag_p2_iso", tr=2300, te=2.3, ti=900), "CT1"),
    (_series("T1W_3D_TFE +C", "T1W_3D_TFE", tr=8.1, te=3.7), "CT1"),
    (_series("sT1W_3D_TFE", "sT1W_3D_TFE", tr=8.1, te=3.7), "T1"),
    (_series("Ax T1 FLAIR", tr=2000, te=10, ti=800, sequence="SE\\IR"), "T1"),  # GE's T1 FLAIR is a T1
    (_series("Ax BRAVO", tr=8, te=3, agent="MultiHance"), "CT1"),  # only the contrast tag tells
    (_series("AX T1 PRE", tr=550, te=12, agent="GADAVIST"), "T1"),  # tag set for the whole exam
    (_series("T1 SE TRA nativ", tr=550, te=12), "T1"),
    (_series("t2_tse_tra", "t2_tse_tra", tr=5000, te=95), "T2"),
    (_series("AX T2 FSE", tr=4500, te=100, agent="GADAVIST"), "T2"),  # acquired after injection
    (_series("T2W_TSE", tr=3000, te=80), "T2"),
    (_series("FLAIR", tr=9000, te=85, ti=2500), "FLAIR"),
    (_series("t2_tirm_tra_dark-fluid", tr=9000, te=85, ti=2500, sequence="SE\\IR"), "FLAIR"),
    (_series("AX T2 FLAIR", tr=9000, te=120, ti=2400), "FLAIR"),
    (_series("3D FLAIR POST GD", tr=5000, te=390, ti=1800), "FLAIR"),
    (_series("Series 7", tr=9000, te=120, ti=2500, sequence="SE\\IR"), "FLAIR"),  # parameters only
    (_series("Series 8", tr=4500, te=100), "T2"),
    (_series("Series 9", tr=500, te=10, agent="Gadovist"), "CT1"),
    (_series("Series 10", tr=500, te=10), "T1"),
    (_series("localizer", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", tr=8, te=4), None),
    (_series("AAHScout", tr=3, te=1.5), None),
    (_series("ep2d_diff_3scan_trace_p2", tr=6000, te=90, sequence="EP"), None),
    (_series("ADC", image_type="DERIVED\\PRIMARY\\DIFFUSION\\ADC"), None),
    (_series("t2_swi_tra", tr=28, te=20), None),
    (_series("t2_fl2d_tra_hemo", tr=650, te=20), None),
    (_series("AX T2*", tr=650, te=20), None),
    (_series("AX T1 POST GD MPR COR", image_type="DERIVED\\SECONDARY\\MPR"), None),
    (_series("ep2d_perf DSC", tr=1500, te=30, agent="GADAVIST"), None),
    (_series("AX T1 POST GD", modality="OT"), None),  # a screen capture
]


@pytest.mark.parametrize("series, expected", CLASSIFIED, ids=[s.description for s, _ in CLASSIFIED])
def test_default_rules_classify_realistic_tags(series, expected):
    assert dicom.load_rules().assign(series)[0] == expected


def test_ambiguous_assignment_and_series_overrides(tmp_path, sources):
    """Two post-contrast T1 series: refused as ambiguous (both named) until --series picks one,
    by UID or by description (any case); a value naming nothing here, or two series, is refused."""
    base, fu = sources
    root = tmp_path / "study"
    specs = {**SPECS, "COR": dict(description="COR T1 POST GD", protocol="COR T1 SE", tr=550, te=12,
                                  contrast="GADAVIST")}
    images = {**base.images, "COR": fu.images["CT1"]}  # other voxels: which one was read shows
    uids = write_study(root, images, specs=specs)
    with pytest.raises(RANOInputError) as e:
        load_study(root)
    one_line_error(e, root, "ambiguous CT1", uids["CT1"], uids["COR"], "--series CT1=")

    by_uid = load_study(root, series={"CT1": uids["COR"]})
    assert_same_image(by_uid.images["CT1"], fu.images["CT1"])
    assert by_uid.sources["CT1"]["chosen_by"] == "--series"
    by_text = load_study(root, series=["CT1=ax t1 post gd"])
    assert_same_image(by_text.images["CT1"], base.images["CT1"])
    # several values for one modality (the two studies of a pair): the one found here is used
    both = load_study(root, series=["CT1=1.2.999.404", f"CT1={uids['CT1']}"])
    assert both.sources["CT1"]["series_uid"] == uids["CT1"]

    with pytest.raises(RANOInputError) as e:
        load_study(root, series=["CT1=SAG T1 POST GD"])
    one_line_error(e, root, "--series CT1=SAG T1 POST GD", "no series")
    with pytest.raises(RANOInputError) as e:
        load_study(root, series=[f"CT1={uids['T1']}", f"T1={uids['T1']}"])
    one_line_error(e, root, "the same series")
    with pytest.raises(RANOInputError, match="unknown modality 'T3'"):
        dicom.parse_series_overrides(["T3=x"])
    with pytest.raises(RANOInputError, match="expected MODALITY="):
        dicom.parse_series_overrides(["CT1"])


def test_rules_file_for_a_site_of_its_own(tmp_path, sources):
    """Descriptions the default rules do not know: a rules file assigns them; a broken rules file
    is one line naming it."""
    base, _ = sources
    root = tmp_path / "study"
    site = {m: dict(description=f"SEQ-{i}", protocol="SITE", tr=1000, te=50) for i, m in enumerate(MODALITIES)}
    uids = write_study(root, base.images, specs=site)
    with pytest.raises(RANOInputError) as e:
        load_study(root)
    one_line_error(e, root, "no series for CT1")
    rules = {"rules": [{"assign": m, "text": rf"\bseq {i}\b"} for i, m in enumerate(MODALITIES)]}
    path = tmp_path / "site-rules.json"
    path.write_text(json.dumps(rules))
    study = load_study(root, rules=path)
    assert {m: s["series_uid"] for m, s in study.sources.items()} == uids
    assert study.sources["T2"]["chosen_by"] == "rule 3"

    for bad, words in (({"rules": [{"assign": "CT1", "text": "("}]}, ("rule 1", "bad regular expression")),
                       ({"rules": [{"assign": "PD", "text": "x"}]}, ("rule 1", "assign")),
                       ({"rules": [{"assign": "CT1", "colour": "x"}]}, ("unknown condition 'colour'",)),
                       ({"rule": []}, ("list",))):
        path.write_text(json.dumps(bad))
        with pytest.raises(RANOInputError) as e:
            dicom.load_rules(path)
        one_line_error(e, path, *words)
    path.write_text("{not json")
    with pytest.raises(RANOInputError) as e:
        dicom.load_rules(path)
    one_line_error(e, path, "not a JSON rules file")
    # the shipped rules are a valid rules file themselves
    path.write_text(json.dumps(dicom.DEFAULT_RULES))
    assert len(dicom.load_rules(path).rules) == len(dicom.DEFAULT_RULES["rules"])


# -------------------------------------------------------------------------------- refusals


def _shift_one_slice(folder: Path, by_mm: float) -> None:
    """Move one slice (the 10th by position) along the slice normal by ``by_mm``."""
    datasets = [(p, pydicom.dcmread(p)) for p in folder.iterdir()]
    datasets.sort(key=lambda t: float(t[1].ImagePositionPatient[2]))
    path, ds = datasets[10]
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) + by_mm]
    ds.save_as(path)


def _remove_tilt_tag(folder: Path) -> None:
    for p in folder.iterdir():
        ds = pydicom.dcmread(p)
        del ds.GantryDetectorTilt
        ds.save_as(p)


# kind -> (write_study arguments, what the message must say, a change made after writing)
REFUSALS = {
    "missing modality": (dict(specs={m: s for m, s in SPECS.items() if m != "T2"}), ("no series for T2",), None),
    "missing slice": (dict(per_series={"FLAIR": dict(drop_slice=20)}),
                      ("FLAIR series", "missing slice", "gap of 8.00 mm"), None),
    "irregular spacing": (dict(), ("T1 series", "irregular slice spacing"),
                          lambda root: _shift_one_slice(root / "DICOM/0003", 1.5)),
    "gantry tilt": (dict(per_series={"T2": dict(tilt_deg=15.0)}), ("T2 series", "gantry tilt of 15 degrees"), None),
    "sheared stack": (dict(per_series={"T2": dict(tilt_deg=15.0)}), ("T2 series", "gantry tilt", "15.0 degrees"),
                      lambda root: _remove_tilt_tag(root / "DICOM/0004")),
    "two patients": (dict(per_series={"T2": dict(patient_id="P-002")}), ("2 patients", "'P-001'", "'P-002'"), None),
    "two studies": (dict(per_series={"FLAIR": dict(study_uid="1.2.826.0.1.99.2")}), ("2 studies",), None),
    "ambiguous": (dict(specs={**SPECS, "X": dict(SPECS["FLAIR"], description="AX FLAIR")}),
                  ("ambiguous FLAIR",), None),
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_bad_dicom_study_is_one_line_naming_the_folder(kind, tmp_path, sources):
    base, _ = sources
    arguments, words, change = REFUSALS[kind]
    root = tmp_path / "study"
    write_study(root, {**base.images, "X": base.images["FLAIR"]}, **arguments)
    if change is not None:
        change(root)
    with pytest.raises(RANOInputError) as e:
        load_study(root)
    one_line_error(e, root, *words)


def test_duplicate_positions_are_refused(tmp_path, sources):
    """Two echoes stored as one series: slices at the same positions."""
    base, _ = sources
    root = tmp_path / "study"
    write_study(root, base.images)
    write_series(base.images["T2"] * 0.5, root / "echo2", **SPECS["T2"], patient_id="P-001",
                 study_uid="1.2.826.0.1.99.1", series_uid="1.2.826.0.1.99.1.4", series_number=4)
    with pytest.raises(RANOInputError) as e:
        load_study(root)
    one_line_error(e, root, "T2 series", "at the same position")


def test_pair_of_different_patients_or_the_same_study(tmp_path, sources):
    """Different PatientIDs: refused unless allow_different; the same study twice: always refused."""
    base, fu = sources
    b_root, f_root = tmp_path / "baseline", tmp_path / "followup"
    write_study(b_root, base.images, patient_id="P-001", study_uid="1.2.826.0.1.99.1")
    write_study(f_root, fu.images, patient_id="P-002", study_uid="1.2.826.0.1.99.7")
    b, f = load_study(b_root), load_study(f_root)
    with pytest.raises(RANOInputError) as e:
        check_pair(b, f)
    one_line_error(e, f_root, "'P-002'", "'P-001'", "--allow-different")
    check_pair(b, f, allow_different=True)
    again = tmp_path / "again"
    shutil.copytree(b_root, again)
    with pytest.raises(RANOInputError) as e:
        check_pair(b, load_study(again), allow_different=True)
    one_line_error(e, again, "the same study", "1.2.826.0.1.99.1")
    nifti = read_study(fu.folder)
    check_pair(b, nifti)  # files carry no patient: nothing to compare


# ------------------------------------------------------------------------------ predict, CLI


@pytest.fixture(scope="module")
def dicom_pair(tmp_path_factory, sources):
    """The phantom pair as two DICOM study folders of one patient."""
    base, fu = sources
    root = tmp_path_factory.mktemp("dicom-pair")
    write_study(root / "baseline", base.images, study_uid="1.2.826.0.1.99.1")
    write_study(root / "followup", fu.images, study_uid="1.2.826.0.1.99.2")
    return root / "baseline", root / "followup"


def _predict_args(baseline: Path, followup: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return ["predict", "--baseline", str(baseline), "--followup", str(followup), "--out", str(out),
            "--bundle", str(bundle), "--device", "cpu", "--no-maps", "--no-scene", *extra]


def test_predict_on_dicom_pair_prints_the_chosen_series(tmp_path, dicom_pair, case_pair, tiny_bundle, capsys):
    """predict on DICOM folders gives the prediction of the NIfTI studies they were made from, and
    prints on stderr which series it used for each modality (description, UID, spacing)."""
    rc = cli_main(_predict_args(*dicom_pair, tmp_path / "dicom-out", tiny_bundle))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for m in MODALITIES:
        assert f"{m:<5} <- '{SPECS[m]['description']}'" in captured.err
    assert captured.err.count("4.00 x 4.00 x 4.00 mm") == 8
    assert "1.2.826.0.1.99.1.2" in captured.err and "1.2.826.0.1.99.2.2" in captured.err
    rc = cli_main(_predict_args(case_pair.baseline, case_pair.followup, tmp_path / "nifti-out", tiny_bundle,
                                "--quiet"))
    assert rc == 0
    dicom_result = json.loads((tmp_path / "dicom-out" / "prediction.json").read_text())
    nifti_result = json.loads((tmp_path / "nifti-out" / "prediction.json").read_text())
    assert dicom_result["label"] == nifti_result["label"]
    for c, p in nifti_result["probabilities"].items():
        assert dicom_result["probabilities"][c] == pytest.approx(p, abs=1e-3)


def test_predict_refuses_a_pair_of_two_patients_unless_allowed(tmp_path, sources, tiny_bundle, capsys):
    """Exit 2, one line naming the follow-up folder, no --out: two patients (unless
    --allow-different) and the same study in two folders (even with it)."""
    base, fu = sources
    b_root, f_root = tmp_path / "b", tmp_path / "f"
    write_study(b_root, base.images, patient_id="P-001", study_uid="1.2.826.0.1.99.1")
    write_study(f_root, fu.images, patient_id="P-002", study_uid="1.2.826.0.1.99.2")
    out = tmp_path / "out"
    copy = tmp_path / "b-copy"
    shutil.copytree(b_root, copy)
    rc = cli_main(_predict_args(b_root, copy, out, tiny_bundle, "--quiet", "--allow-different"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(copy) in err and "the same study" in err, err
    assert not out.exists()
    rc = cli_main(_predict_args(b_root, f_root, out, tiny_bundle, "--quiet"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and str(f_root) in err, err
    assert "PatientID" in err and not out.exists()
    rc = cli_main(_predict_args(b_root, f_root, out, tiny_bundle, "--quiet", "--allow-different"))
    assert rc == 0, capsys.readouterr().err
    assert (out / "prediction.json").is_file()


def test_predict_series_flags(tmp_path, sources, tiny_bundle, capsys):
    """--series chooses between two candidate series by description; --series-rules replaces the
    rules; a malformed --series or rules file is one line before anything is read."""
    base, fu = sources
    specs = {**SPECS, "COR": dict(SPECS["CT1"], description="COR T1 POST GD")}
    b_root, f_root = tmp_path / "b", tmp_path / "f"
    write_study(b_root, {**base.images, "COR": base.images["CT1"]}, specs=specs, study_uid="1.2.826.0.1.99.1")
    write_study(f_root, {**fu.images, "COR": fu.images["CT1"]}, specs=specs, study_uid="1.2.826.0.1.99.2")
    out = tmp_path / "out"
    rc = cli_main(_predict_args(b_root, f_root, out, tiny_bundle, "--quiet"))
    err = capsys.readouterr().err
    assert rc == 2 and "ambiguous CT1" in err and err.count("\n") == 1 and not out.exists()
    rc = cli_main(_predict_args(b_root, f_root, out, tiny_bundle, "--series", "CT1=COR T1 POST GD"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("CT1   <- 'COR T1 POST GD'") == 2
    rules = tmp_path / "rules.json"
    site_rule = {"assign": None, "why": "this site's coronal series", "text": r"^cor\b"}
    rules.write_text(json.dumps({"rules": [site_rule, *dicom.DEFAULT_RULES["rules"]]}))
    rc = cli_main(_predict_args(b_root, f_root, tmp_path / "out2", tiny_bundle, "--series-rules", str(rules)))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("CT1   <- 'AX T1 POST GD'") == 2
    missing_rules = str(tmp_path / "none.json")
    for extra, named in ((["--series", "CT2=x"], "CT2"), (["--series-rules", missing_rules], "none.json")):
        rc = cli_main(_predict_args(b_root, f_root, tmp_path / "out3", tiny_bundle, "--quiet", *extra))
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and named in err, err


# ------------------------------------------------------------------------------------ Slicer


def test_slicer_study_loading_accepts_a_dicom_folder(tmp_path, sources):
    """The module's study loading (scene.load_study_nodes) takes a DICOM folder through load_study:
    nodes with the series' voxels and geometry; a missing modality is left out with missing_ok."""
    from RANOResponseLib.mrml.scene import load_study_nodes, new_scene, node_to_image

    base, _ = sources
    root = tmp_path / "study"
    write_study(root, base.images, specs={m: s for m, s in SPECS.items() if m != "T2"})
    assert missing_modalities(root, MODALITIES) == ["T2"]
    scene = new_scene()
    with pytest.raises(RANOInputError) as e:
        load_study_nodes(scene, root, MODALITIES, "baseline")
    one_line_error(e, root, "no series for T2")
    nodes = load_study_nodes(scene, root, MODALITIES, "baseline", missing_ok=True)
    assert list(nodes) == ["CT1", "T1", "FLAIR"]
    for m, node in nodes.items():
        assert node.GetName() == f"baseline {m}" and node.GetStorageNode() is None
        assert_same_image(node_to_image(node), base.images[m], atol=1e-4)


def test_panel_loads_a_dicom_study_folder(tmp_path, sources, case_pair, tiny_bundle):
    """The module's folder loading (PanelLogic.load_studies): a DICOM baseline and a NIfTI follow-up
    fill the panel's volumes; a DICOM folder without a modality the bundle needs is refused before
    any node is added."""
    from RANOResponseLib.mrml.logic import PanelLogic
    from RANOResponseLib.mrml.scene import new_scene, node_to_image
    from test_panel_logic import params

    base, fu = sources
    root = tmp_path / "baseline"
    write_study(root, base.images)
    lacking = tmp_path / "lacking"
    write_study(lacking, base.images, specs={m: s for m, s in SPECS.items() if m != "FLAIR"})
    logic = PanelLogic(new_scene())
    p = params(bundle=tiny_bundle, baselineFolder=lacking, followupFolder=case_pair.followup)
    with pytest.raises(RANOInputError, match=r"lacking: missing FLAIR \(the model bundle needs"):
        logic.load_studies(p)
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    p.baselineFolder = root
    assert logic.load_studies(p) is p.baselineCT1
    for m in MODALITIES:
        assert_same_image(node_to_image(getattr(p, f"baseline{m}")), base.images[m], atol=1e-4)
        assert_same_image(node_to_image(getattr(p, f"followup{m}")), fu.images[m], atol=1e-4)
