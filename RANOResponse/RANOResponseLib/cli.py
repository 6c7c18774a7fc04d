"""``rano-response``: the command-line face of the core.

    rano-response phantom  --out DIR --patients N --seed S [--spacing MM]
                           [--clinical HEAD.nii.gz [--clinical-variants head,thick,oblique,dicom]]
    rano-response predict  --baseline DIR --followup DIR --out OUT [--bundle B] [--device D] [--roi-center R,A,S]
                           [--series MOD=UID|DESCRIPTION ...] [--series-rules FILE] [--allow-different]
                           [--brain-mask auto|model|none|FILE|BASE,FOLLOW] [--seg-bundle S | --no-segmentation]
    rano-response timeline --patient DIR|CSV --out OUT [--baseline-timepoint WEEK] [--bundle B] [--seg-bundle S]
                           [--segmentation auto|cohort] [--no-network] [--brain-mask auto|model|none] [--rt-end-week W]
    rano-response bench    [--runs 3] [--spacing 1] [--head HEAD.nii.gz]
    rano-response measure  --baseline DIR --followup DIR | --prediction OUT [--out measurements.json]
    rano-response review   import|add|status|export|serve --db DB [...]
    rano-response report   --prediction OUT --out report.pdf [--db DB] [--measurements JSON]

``train`` and ``evaluate`` belong to ResponseTrainingLib: they are added by the ``rano-response``
program (:mod:`RANOResponseCLI`), which sits above both Lib packages, through ``plugins``; this
module never imports training code.

Bad input is reported as one line ``error: <file>: <problem>`` on stderr, with exit status 2
and nothing left in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from RANOResponseLib.core.errors import RANOInputError


def _cmd_phantom(args: argparse.Namespace) -> int:
    from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort

    cfg = PhantomConfig(patients=args.patients, seed=args.seed, spacing=args.spacing,
                        min_followups=args.min_followups, max_followups=args.max_followups,
                        quirks=not args.no_quirks)
    head = None
    if args.clinical is not None:  # refuse an unknown head before generating anything
        from RANOResponseLib.phantom.clinical import load_head, parse_variants

        variants = parse_variants(args.clinical_variants)
        head = load_head(args.clinical)
    truth = generate_cohort(Path(args.out), cfg, progress=lambda m: print(m, file=sys.stderr))
    follow = truth[truth["role"] == "follow-up"]
    print(f"wrote {args.patients} patients to {Path(args.out).absolute()}")
    print("follow-up ratings:", json.dumps(follow["rating_written"].value_counts().to_dict()))
    if head is not None:
        from RANOResponseLib.phantom.clinical import make_clinical_cohort

        table = make_clinical_cohort(Path(args.out), head, variants=variants, seed=args.seed,
                                     progress=lambda m: print(m, file=sys.stderr))
        print(f"wrote {len(table)} clinical-style studies ({', '.join(variants)}) to "
              f"{(Path(args.out) / 'clinical').absolute()}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from RANOResponseLib.imaging.dicom import load_rules, parse_series_overrides
    from RANOResponseLib.imaging.studies import describe_sources
    from RANOResponseLib.inference.pipeline import run_predict
    from RANOResponseLib.mrml.outputs import output_writers

    # checked before anything is read, so a typo is one line even when the studies are NIfTI
    args.series = parse_series_overrides(args.series)
    args.series_rules = load_rules(args.series_rules) if args.series_rules is not None else None

    def progress(stage: str, frac: float) -> None:
        if not args.quiet:
            print(f"[{frac * 100:5.1f}%] {stage}", file=sys.stderr)

    result, files = run_predict(args.baseline, args.followup, args.out, bundle=args.bundle,
                                device=args.device, attributions=not args.no_maps,
                                progress=progress, roi_center=args.roi_center,
                                writers=output_writers(pictures=not (args.no_maps or args.no_pictures),
                                                       scene=not args.no_scene),
                                brain_mask=args.brain_mask, series=args.series, series_rules=args.series_rules,
                                allow_different=args.allow_different, segmentation=not args.no_segmentation,
                                seg_bundle=args.seg_bundle)
    if not args.quiet:
        for role, study in (("baseline", result.baseline), ("follow-up", result.followup)):
            print(describe_sources(study, f"{role} {study.folder}"), file=sys.stderr)
    probs = "  ".join(f"{c}={p:.3f}" for c, p in result.probabilities.items())
    print(f"label: {result.label}")
    print(f"probabilities: {probs}")
    print(f"input check: {result.input_check['verdict']}")
    for reason in result.input_check["reasons"]:
        print(f"  - {reason}")
    if result.measured is not None:
        m = result.measured
        print(f"measured (automatic segmentation): RANO {m['category']}, RANO 2.0 volumetric {m['category_rano2']}"
              f" - {m['comparison']['message']}")
    print(f"device: {result.device}   total {sum(v for k, v in result.timings.items() if k != 'total'):.1f} s")
    print(f"outputs in {Path(args.out).absolute()}:")
    for name, path in files.items():
        print(f"  {name:12s} {path}")
    return 0


def _cmd_timeline(args: argparse.Namespace) -> int:
    from RANOResponseLib.inference.timeline import run_timeline
    from RANOResponseLib.review.course_report import course_writers

    doc = run_timeline(args.patient, args.out, baseline_timepoint=args.baseline_timepoint, bundle=args.bundle,
                       seg_bundle=args.seg_bundle, device=args.device, network=not args.no_network,
                       segmentation=args.segmentation, brain_mask=args.brain_mask, rt_end_weeks=args.rt_end_week,
                       writers=course_writers(), show_progress=not args.quiet)
    print(f"{doc['patient']}: baseline {doc['baseline']} ({doc['baseline_reason']})")
    for x in doc["skipped"]:
        print(f"  skipped {x['timepoint']}: {x['reason']}")
    for r in doc["timepoints"]:
        net = (r["network"] or {}).get("label", "")
        print(f"  {r['timepoint']:12s} {r['weeks']:6.1f} wk  {r['role']:12s} SPD {r['spd_mm2']:8.0f} mm2  "
              f"RANO {r['category'] or '-':3s} {r['confirmed']:8s} RANO2 {r['category_rano2'] or '-':3s}"
              + (f"  network {net}" if net else "") + ("  (cached)" if r["cached"] else ""))
    print(f"total {doc['timings_s']['total']:.1f} s; outputs in {Path(args.out).absolute()}: "
          + ", ".join(["timeline.json", *doc["outputs"].values()]))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from RANOResponseLib.bench import run_bench

    return run_bench(runs=args.runs, spacing=args.spacing, device=args.device, workdir=args.workdir, head=args.head)


# ---- measure / review / report (radiologist in the loop) -------------------------------


def _cmd_measure(args: argparse.Namespace) -> int:
    from RANOResponseLib.rano.measurement import (
        MeasurableCriteria,
        find_pair_segmentations,
        lesion_table,
        measure_prediction,
        measure_timepoints,
    )
    from RANOResponseLib.rano.rules import compare_with_prediction, decide, write_assessment

    criteria = MeasurableCriteria(min_volume_ml=args.min_volume_ml)
    if args.baseline and args.followup:
        transform = args.transform
        if transform is None and args.prediction is not None:  # predict's transform relates native images
            tfm = Path(args.prediction) / "followup_to_baseline.tfm"
            native = find_pair_segmentations(args.baseline, args.followup, args.source)[0].space == "native"
            transform = tfm if tfm.is_file() and native else None
        pair = measure_timepoints(args.baseline, args.followup, transform, args.source, criteria, args.margin_mm)
    elif args.prediction is not None and not (args.baseline or args.followup):
        pair = measure_prediction(args.prediction, args.source, criteria, args.margin_mm)
    else:
        raise RANOInputError("measure needs --baseline and --followup, or --prediction OUTDIR")
    rule = decide(pair, criteria=args.criteria)
    comparison = compare_with_prediction(rule, args.prediction) if args.prediction is not None else None
    print(f"segmentations: {pair.baseline.source}\n               {pair.followup.source}")
    print(f"follow-up related by: {pair.transform}")
    for r in lesion_table(pair):
        print(f"  {r['timepoint']:9s} {r['lesion']:4s} {r['d1_mm']:6.1f} x {r['d2_mm']:5.1f} mm  "
              f"{r['product_mm2']:7.0f} mm2  {r['enhancing_ml']:6.2f} mL  measurable {r['measurable']:3s}  {r['status']}")
    print(f"rule-based category: {rule.category} ({rule.criteria}; 2D {rule.bidimensional}, "
          f"volumetric {rule.volumetric})")
    for line in rule.reasoning:
        print(f"  - {line}")
    if comparison is not None:
        print(comparison.message)
    if args.out is not None:
        write_assessment(args.out, pair, rule, comparison)
        print(f"written: {Path(args.out).absolute()}")
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    from RANOResponseLib.review.store import Case, ReviewStore, load_worklist, make_verdict

    if args.review_command == "import":
        cases = load_worklist(args.worklist)
        with ReviewStore(args.db) as store:
            added = store.add_cases(cases)
        print(f"{len(cases)} cases in the worklist, {added} new, in {Path(args.db).absolute()}")
        return 0
    if args.review_command == "add":
        from RANOResponseLib.core.outputs import read_prediction

        with ReviewStore(args.db) as store:
            case = store.case(args.case_id)
            if case is None:
                if not (args.baseline and args.followup):
                    raise RANOInputError(f"{args.db}: case {args.case_id!r} is not in the worklist "
                                         "(import it, or give --baseline and --followup)")
                case = Case(args.case_id, str(Path(args.baseline).absolute()), str(Path(args.followup).absolute()),
                            Path(args.followup).absolute().parent.name)
                store.add_cases([case])
            pred_dir = args.prediction or case.prediction or None
            prediction = read_prediction(pred_dir) if pred_dir else None
            rule = args.rule_category
            if args.measurements is not None:
                from RANOResponseLib.rano.rules import read_assessment

                rule = read_assessment(args.measurements)[1]
            v = store.save(make_verdict(case, args.reviewer, None if args.agree else args.label, args.confidence,
                                        args.note, prediction, rule))
        print(f"saved verdict {v.id}: {v.case_id} {v.label} by {v.reviewer} at {v.created_at}"
              + (f" (revises {v.supersedes})" if v.supersedes else ""))
        return 0
    if args.review_command == "serve":
        try:
            from RANOResponseLib.web.router import serve
        except ImportError as e:
            raise RANOInputError(f"review serve needs the web extra ({e.name} is missing): "
                                 "pip install -c constraints.txt -e '.[web]'") from None
        return serve(args.db, args.worklist, args.host, args.port, args.token, args.outputs, args.bundle,
                     args.device, args.max_sessions)
    if args.review_command == "status":
        with ReviewStore(args.db, create=False) as store:
            st = store.status()
        if args.json:
            print(json.dumps(st, indent=2))
            return 0
        print(f"{st['database']}: {st['cases']} cases, {st['verdicts']} verdicts saved")
        for name, r in sorted(st["reviewers"].items()):
            print(f"  {name}: {r['reviewed']} reviewed, {r['disagree_with_model']} overriding the model, "
                  f"{r['revisions']} revisions")
        print("  labels (latest per case and reviewer):", json.dumps(st["labels"]))
        return 0
    with ReviewStore(args.db, create=False) as store:  # export
        out = store.export_csv(args.out, reviewer=args.reviewer, history=args.history)
        n = len(store.history(reviewer=args.reviewer) if args.history else store.latest(reviewer=args.reviewer))
    print(f"{n} verdicts written to {out.absolute()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from RANOResponseLib.review.report import write_report

    png = Path(args.out).with_suffix("") if args.png else None
    out = write_report(args.prediction, args.out, args.measurements, args.db, args.case_id, args.source,
                       args.criteria, png)
    print(f"report: {Path(out).absolute()}" + (f"  (pages as {png}-page1.png, -page2.png)" if png else ""))
    return 0


def _add_review_parsers(sub: argparse._SubParsersAction) -> None:
    from RANOResponseLib.core.names import CLASS_NAMES

    # automatic: predict's own segmentations (with --prediction); auto tries the manual masks first
    sources = ("auto", "deepbratumia-native", "hd-glio", "deepbratumia-atlas", "automatic")
    criteria = ("RANO", "RANO2")  # RANO2: RANO 2.0 volumetric thresholds decide the category
    me = sub.add_parser("measure", help="RANO lesion measurements and the rule-based category of a case pair")
    me.add_argument("--baseline", type=Path, help="baseline timepoint folder (LUMIERE layout)")
    me.add_argument("--followup", type=Path, help="follow-up timepoint folder")
    me.add_argument("--prediction", type=Path, help="predict output folder: its studies, transform and "
                    "prediction (compared with the rules)")
    me.add_argument("--transform", type=Path, help="follow-up_to_baseline .tfm (default: the prediction's, "
                    "else registered here; atlas masks need none)")
    me.add_argument("--source", choices=sources, default="auto", help="which segmentation to use")
    me.add_argument("--criteria", choices=criteria, default="RANO")
    me.add_argument("--margin-mm", type=float, default=2.0, help="registration tolerance for matching lesions")
    me.add_argument("--min-volume-ml", type=float, default=0.0, help="ignore smaller components as noise")
    me.add_argument("--out", type=Path, help="write measurements.json here")
    me.set_defaults(func=_cmd_measure)

    rv = sub.add_parser("review", help="radiologist review database: import, add, status, export")
    rsub = rv.add_subparsers(dest="review_command", required=True)
    ri = rsub.add_parser("import", help="register a worklist (CSV of case pairs or a LUMIERE folder)")
    ri.add_argument("--db", required=True, type=Path)
    ri.add_argument("--worklist", required=True, type=Path)
    ra = rsub.add_parser("add", help="save one verdict (scripting)")
    ra.add_argument("--db", required=True, type=Path)
    ra.add_argument("--case-id", required=True)
    ra.add_argument("--reviewer", required=True)
    verdict = ra.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--label", choices=CLASS_NAMES, help="the radiologist's class")
    verdict.add_argument("--agree", action="store_true", help="agree with the model's prediction")
    ra.add_argument("--confidence", type=int, required=True, choices=range(1, 6), metavar="1-5")
    ra.add_argument("--note", default="")
    ra.add_argument("--prediction", type=Path, help="predict output folder (model label, probabilities, bundle)")
    ra.add_argument("--measurements", type=Path, help="measurements.json for the rule-based category")
    ra.add_argument("--rule-category", choices=CLASS_NAMES, help="rule-based category, if no measurements.json")
    ra.add_argument("--baseline", type=Path, help="for a case not in the worklist")
    ra.add_argument("--followup", type=Path)
    rs = rsub.add_parser("status", help="how far the review is")
    rs.add_argument("--db", required=True, type=Path)
    rs.add_argument("--json", action="store_true")
    rx = rsub.add_parser("export", help="verdicts as a label CSV for ResponseTraining")
    rx.add_argument("--db", required=True, type=Path)
    rx.add_argument("--out", required=True, type=Path)
    rx.add_argument("--reviewer", help="only this reviewer's verdicts")
    rx.add_argument("--history", action="store_true", help="every verdict, not only the latest per case and reviewer")
    rw = rsub.add_parser("serve", help="review station in the browser (needs the web extra)")
    rw.add_argument("--db", required=True, type=Path)
    rw.add_argument("--worklist", required=True, type=Path, help="CSV of case pairs or a LUMIERE folder")
    rw.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback a token is required)")
    rw.add_argument("--port", type=int, default=8090)
    rw.add_argument("--token", default=os.environ.get("RANO_REVIEW_TOKEN"),
                    help="secret every new browser session must present (default: $RANO_REVIEW_TOKEN; generated "
                         "and printed when listening beyond loopback)")
    rw.add_argument("--outputs", type=Path, help="folder for predictions made by the server "
                    "(default: DB's name + '-predictions' beside it)")
    rw.add_argument("--bundle", type=Path, help="model bundle (default: the shipped one)")
    rw.add_argument("--device", default="auto")
    rw.add_argument("--max-sessions", type=int, default=16, help="browser sessions at most at once")
    rv.set_defaults(func=_cmd_review)

    rp = sub.add_parser("report", help="per-case PDF report (images, probabilities, measurements, verdict)")
    rp.add_argument("--prediction", required=True, type=Path, help="predict output folder")
    rp.add_argument("--out", required=True, type=Path, help="report.pdf")
    rp.add_argument("--db", type=Path, help="review database with the verdicts")
    rp.add_argument("--case-id", help="case id in the review database (default: matched by study folders)")
    rp.add_argument("--measurements", type=Path, help="measurements.json (default: measured from the segmentations)")
    rp.add_argument("--source", choices=sources, default="auto")
    rp.add_argument("--criteria", choices=criteria, default="RANO")
    rp.add_argument("--png", action="store_true", help="also write each page as PNG next to the PDF")
    rp.set_defaults(func=_cmd_report)


def _ras_point(text: str) -> tuple[float, float, float]:
    """``R,A,S`` in mm (three finite numbers) for ``--roi-center``."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(abs(v) < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not R,A,S (three numbers in mm, e.g. 12.5,-20,8)")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rano-response", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write a synthetic longitudinal cohort in LUMIERE's layout")
    ph.add_argument("--out", required=True, type=Path)
    ph.add_argument("--patients", type=int, default=6)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    ph.add_argument("--min-followups", type=int, default=2)
    ph.add_argument("--max-followups", type=int, default=4)
    ph.add_argument("--no-quirks", action="store_true", help="leave out LUMIERE's CSV/layout quirks")
    ph.add_argument("--clinical", type=Path, default=None, metavar="HEAD.nii.gz",
                    help="also write clinical-style versions of every study into OUT/clinical/<variant>/: the "
                         "phantom brain inside this real full head (pydeface 2.1.0's mean_reg2mean.nii.gz; "
                         "make demo fetches it), thick slices, own acquisitions, DICOM")
    ph.add_argument("--clinical-variants", default="head,thick,oblique,dicom", metavar="LIST",
                    help="which clinical-style versions, comma-separated (default head,thick,oblique,dicom)")
    ph.set_defaults(func=_cmd_phantom)

    pr = sub.add_parser("predict", help="classify the response between two studies, with maps")
    pr.add_argument("--baseline", required=True, type=Path, help="baseline study folder")
    pr.add_argument("--followup", required=True, type=Path, help="follow-up study folder")
    pr.add_argument("--out", required=True, type=Path, help="output folder")
    pr.add_argument("--bundle", type=Path, default=None, help="model bundle folder (default: shipped)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    pr.add_argument("--no-maps", action="store_true", help="skip saliency, Grad-CAM and the overlay")
    pr.add_argument("--roi-center", type=_ras_point, default=None, metavar="R,A,S",
                    help="centre of the crop in RAS mm, as Slicer shows it (default: the baseline brain's centre)")
    pr.add_argument("--no-scene", action="store_true", help="do not write the Slicer scene (scene/RANOResponse.mrml)")
    pr.add_argument("--no-pictures", action="store_true",
                    help="do not render overlay.png and the slice views (the maps are still written)")
    pr.add_argument("--series", action="append", default=[], metavar="MOD=VALUE",
                    help="DICOM study folders: the series to use for a modality, by SeriesInstanceUID or "
                         "SeriesDescription (repeatable; e.g. --series \"CT1=AX T1 POST GD\")")
    pr.add_argument("--series-rules", type=Path, default=None, metavar="FILE",
                    help="DICOM study folders: JSON rules that assign series to CT1/T1/T2/FLAIR "
                         "(default: the built-in rules, RANOResponseLib.imaging.dicom.DEFAULT_RULES)")
    pr.add_argument("--allow-different", action="store_true",
                    help="accept DICOM baseline and follow-up studies of different PatientIDs")
    pr.add_argument("--brain-mask", default="auto", metavar="auto|model|none|FILE|BASE,FOLLOW",
                    help="how each study's brain is found: auto (skull-stripped images: their non-zero region; "
                         "others: HD-BET), model (always HD-BET), none (every non-zero voxel), a mask file name "
                         "inside each study folder, or two mask files BASE,FOLLOW (default auto)")
    segmenting = pr.add_mutually_exclusive_group()
    segmenting.add_argument("--seg-bundle", type=Path, default=None, metavar="S",
                    help="segmentation bundle: ours (bundle.json) or a MONAI bundle folder with a rano_labels.json "
                         "label mapping, or that JSON (default: the shipped one, or $RANO_RESPONSE_SEG_BUNDLE)")
    segmenting.add_argument("--no-segmentation", action="store_true",
                    help="do not measure RANO from a segmentation (prediction.json's measured: null); the tumour "
                         "is still segmented when the classifier reads the segmentation (the shipped one does)")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_cmd_predict)

    be = sub.add_parser("bench", help="time each stage of predict on a 1 mm phantom case pair")
    be.add_argument("--runs", type=int, default=3)
    be.add_argument("--spacing", type=float, default=1.0)
    be.add_argument("--device", default="auto")
    be.add_argument("--workdir", type=Path, default=None)
    be.add_argument("--head", type=Path, default=None, metavar="HEAD.nii.gz",
                    help="a full head (pydeface's mean_reg2mean.nii.gz) for the unstripped DICOM pair's line "
                         "(make bench fetches it)")
    be.set_defaults(func=_cmd_bench)

    tl = sub.add_parser("timeline", help="RANO over every timepoint of one patient (nadir, baseline, confirmation)")
    tl.add_argument("--patient", required=True, type=Path, metavar="DIR|CSV",
                    help="a LUMIERE patient folder (Patient-XXX with week-* folders) or a CSV of study folders "
                         "(columns study, date YYYY-MM-DD; optional timepoint, rating, patient)")
    tl.add_argument("--out", required=True, type=Path, help="output folder (also the per-timepoint cache)")
    tl.add_argument("--baseline-timepoint", default=None, metavar="WEEK",
                    help="the baseline (default: the first post-operative scan, else the scan after the pre-op one)")
    tl.add_argument("--bundle", type=Path, default=None, help="response model bundle (default: shipped)")
    tl.add_argument("--seg-bundle", type=Path, default=None, help="segmentation bundle (default: shipped)")
    tl.add_argument("--segmentation", choices=("auto", "cohort"), default="auto",
                    help="auto: the segmentation bundle; cohort: the cohort's own DeepBraTumIA native masks "
                         "(research data that come with masks)")
    tl.add_argument("--no-network", action="store_true", help="do not run the response network on each pair")
    tl.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    tl.add_argument("--brain-mask", choices=("auto", "model", "none"), default="auto",
                    help="auto (skull-stripped: their non-zero region; others: HD-BET), model (HD-BET), none")
    tl.add_argument("--rt-end-week", type=float, default=None, metavar="W",
                    help="week radiotherapy ended, on the course's week scale (default: assumed at the baseline "
                         "scan); PD within 12 weeks after it is preliminary (pseudoprogression possible)")
    tl.add_argument("--quiet", action="store_true", help="no progress bar")
    tl.set_defaults(func=_cmd_timeline)


    _add_review_parsers(sub)
    return p


# A plugin adds its sub-commands to the parser and returns the commands that parse their own
# arguments (name -> main(argv)), such as ``train``.
Plugin = Callable[[argparse._SubParsersAction], Mapping[str, Callable[[list[str]], int]]]


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (Cancel in Slicer, a job scheduler) unwinds like Ctrl-C, so staging folders and
    temporary files are removed by their ``finally`` blocks instead of being left behind."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _attach_negative_points(argv: list[str]) -> list[str]:
    """``--roi-center -12,5,30`` -> ``--roi-center=-12,5,30``: argparse takes a value that starts
    with '-' (and is no plain number) for an option, so a point with a negative R would fail."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--roi-center" and arg.startswith("-"):
            out[-1] = f"--roi-center={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None, plugins: Sequence[Plugin] = ()) -> int:
    """Run one command; ``plugins`` add commands from packages above the core."""
    argv = _attach_negative_points(list(sys.argv[1:] if argv is None else argv))
    _stop_cleanly_on_sigterm()
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        own_parsing: dict[str, Callable[[list[str]], int]] = {}
        for plugin in plugins:
            own_parsing.update(plugin(sub))
        if argv and argv[0] in own_parsing:
            return own_parsing[argv[0]](argv[1:])
        args = parser.parse_args(argv)
        return args.func(args)
    except RANOInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
