"""Score a bundle on a labelled LUMIERE-layout cohort through the clinical prediction path, at scale.

Pairs run in parallel worker processes (``workers``; each loads the bundle once and takes
``threads`` torch threads; with several devices, ``cuda:0,cuda:1``, worker *i* takes device
*i* mod n). Every finished pair is written atomically as ``OUT/pairs/<pair>.json``; a run
restarted with ``resume`` skips the pairs finished with the same bundle and options.

Two modes:

- full (default): :func:`~RANOResponseLib.inference.pipeline.predict_pair` per pair, as
  ``rano-response predict`` runs it: calibrated probabilities and the "uncertain" flag, the
  automatic segmentation's measured RANO category and the suggested category (when the bundle
  has a suggestion model), and with maps the explanation measures (energy inside tumour + edema,
  pointing game);
- ``fast``: probabilities only, from the preprocessing cache shared with ``rano-response train
  --cache`` (each pair prepared once by the same path, stored float16), for re-scoring bundles.

Written: ``predictions.csv`` (one row per pair), ``pairs.csv`` (every rating row, used or
skipped), ``metrics.json`` (balanced accuracy with a patient-level bootstrap 95% interval, per-class
recall, ECE before and after calibration, the same for the measured and suggested categories,
explanation aggregates), ``confusion.csv`` / ``confusion.png`` (and ``_measured`` /
``_suggested`` variants), ``reliability.png``.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from RANOResponseLib.core.files import write_text
from RANOResponseLib.datasets.lumiere import Pair, build_pairs
from RANOResponseLib.model.bundle import Bundle, read_bundle
from tqdm import tqdm

from ResponseTrainingLib.analysis.calibration import expected_calibration_error
from ResponseTrainingLib.analysis.metrics import bootstrap_balanced_accuracy, classification_metrics

MAP_NAMES = ("saliency", "gradcam")
_WORKER: dict[str, Any] = {}  # what a worker process holds: bundle, device, options


def _init_worker(bundle_path: str, devices: Sequence[str], counter: Any, threads: int, options: dict) -> None:
    """Per worker process: its device (round robin over ``devices``), torch threads, the bundle."""
    import torch

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if threads > 0:
        torch.set_num_threads(threads)
    _WORKER.update(bundle=read_bundle(bundle_path), device=devices[index % len(devices)], options=options)


def _pair_fields(pair: Pair) -> dict[str, Any]:
    return {"pair": pair.id, "patient": pair.patient, "label": pair.label}


def _run_pair(pair: Pair, record_path: str) -> dict[str, Any]:
    """One pair in a worker: predict, turn the summary into a record, write it atomically."""
    bundle, device, opt = _WORKER["bundle"], _WORKER["device"], _WORKER["options"]
    if opt["fast"]:
        summary = _fast_summary(pair, bundle, device, Path(opt["cache"]))
    else:
        from RANOResponseLib.inference.pipeline import predict_pair

        r = predict_pair(pair.baseline, pair.followup, bundle, device, attributions=opt["maps"],
                         notice=lambda m: None, segmentation=opt["segmentation"], seg_bundle=opt["seg_bundle"])
        summary = r.summary()
        summary["seconds"] = r.timings.get("total")
    record = {**_pair_fields(pair), "key": opt["key"], **{k: summary.get(k) for k in (
        "label", "probabilities", "probabilities_uncalibrated", "uncertain", "suggested", "explanations", "seconds")}}
    record["predicted"] = record.pop("label")
    record["label"] = pair.label
    measured = summary.get("measured") or {}
    record["measured"] = measured.get("category")
    write_text(json.dumps(record, indent=1) + "\n", record_path)
    return record


def _fast_summary(pair: Pair, bundle: Bundle, device: str, cache: Path) -> dict[str, Any]:
    """Probabilities from the preprocessing cache: the ensemble and the bundle's calibration."""
    import time

    import torch
    from RANOResponseLib.inference.attributions import predict
    from RANOResponseLib.inference.calibration import apply_calibration
    from RANOResponseLib.model.bundle import load_models
    from RANOResponseLib.model.device import resolve_device

    from ResponseTrainingLib.data.dataset import cache_pairs

    t = time.perf_counter()
    dev = resolve_device(device)
    if _WORKER.get("models_key") != (str(bundle.path), str(dev)):
        _WORKER["models"], _WORKER["models_key"] = load_models(bundle, dev), (str(bundle.path), str(dev))
    path = cache_pairs([pair], bundle.spec, cache, progress=False, device=dev)[0]
    x = torch.from_numpy(np.load(path).astype(np.float32)[None]).to(dev)
    pred = predict(_WORKER["models"], x)
    apply_calibration(pred, bundle.calibration, bundle.class_names)
    names = bundle.class_names
    return {"label": names[int(np.argmax(pred.probabilities))],
            "probabilities": {c: float(p) for c, p in zip(names, pred.probabilities)},
            "probabilities_uncalibrated": {c: float(p) for c, p in zip(names, pred.uncalibrated)},
            "uncertain": pred.uncertain, "seconds": time.perf_counter() - t}


def run_pairs(pairs: Sequence[Pair], bundle_path: Path, out: Path, devices: Sequence[str], workers: int,
              threads: int, options: dict, resume: bool) -> list[dict[str, Any]]:
    """Every pair's record, in pair order: finished ones read back (``resume``), the others run in
    ``workers`` processes (in this process when 1)."""
    folder = out / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        f = folder / f"{pair.id}.json"
        if f.is_file():
            rec = json.loads(f.read_text(encoding="utf-8")) if resume else None
            if rec is not None and rec.get("key") == options["key"]:
                records[pair.id] = rec
            else:
                f.unlink()
    todo = [p for p in pairs if p.id not in records]
    if records:
        print(f"evaluate: {len(records)} pairs finished earlier, {len(todo)} to run", file=sys.stderr, flush=True)
    bar = tqdm(total=len(todo), desc="evaluate", unit="pair", file=sys.stderr)
    if workers <= 1:
        import torch

        before = torch.get_num_threads()  # in this process: --threads must not outlive the evaluation
        try:
            _init_worker(str(bundle_path), devices, multiprocessing.Value("i", 0), threads, options)
            for pair in todo:
                records[pair.id] = _run_pair(pair, str(folder / f"{pair.id}.json"))
                bar.update()
        finally:
            torch.set_num_threads(before)
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked torch state in the workers
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(bundle_path), list(devices), ctx.Value("i", 0), threads, options)) as ex:
            futures = {ex.submit(_run_pair, p, str(folder / f"{p.id}.json")): p for p in todo}
            for fut in as_completed(futures):
                records[futures[fut].id] = fut.result()
                bar.update()
    bar.close()
    return [records[p.id] for p in pairs]


def predictions_table(records: Sequence[dict[str, Any]], class_names: Sequence[str]) -> pd.DataFrame:
    """``predictions.csv``: one row per pair (calibrated and network probabilities, uncertain,
    measured and suggested categories, explanation measures)."""
    rows = []
    for r in records:
        row = {k: r[k] for k in ("pair", "patient", "label", "predicted")}
        row.update({f"p_{c}": r["probabilities"][c] for c in class_names})
        raw = r.get("probabilities_uncalibrated") or r["probabilities"]
        row.update({f"p_uncalibrated_{c}": raw[c] for c in class_names})
        unc = r.get("uncertain") or {}
        row.update(uncertain=unc.get("flag"), uncertain_why=unc.get("why"), measured=r.get("measured"))
        sug = r.get("suggested") or {}
        row["suggested"] = sug.get("category")
        row.update({f"suggested_p_{c}": (sug.get("probabilities") or {}).get(c) for c in class_names})
        exp = r.get("explanations") or {}
        row["region_share_of_brain"] = exp.get("region_share_of_brain")
        for m in MAP_NAMES:
            mm = (exp.get("maps") or {}).get(m) or {}
            row[f"{m}_energy_inside"] = mm.get("energy_inside")
            row[f"{m}_peak_inside"] = mm.get("peak_inside")
        row["seconds"] = r.get("seconds")
        rows.append(row)
    return pd.DataFrame(rows)


def _categorical(name: str, table: pd.DataFrame, column: str, class_names: Sequence[str], out: Path,
                 bootstrap: int) -> dict[str, Any] | None:
    """Metrics of a category column (measured, suggested) against the labels, over the pairs that
    have one; its confusion matrix as CSV and PNG."""
    t = table[table[column].isin(class_names)]
    if not len(t):
        return None
    y = t["label"].map(class_names.index).to_numpy(dtype=int)
    pred = t[column].map(class_names.index).to_numpy(dtype=int)
    m = classification_metrics(y, np.eye(len(class_names))[pred], class_names)
    m.pop("auc_ovr")  # a one-hot "probability" has no ranking
    m["balanced_accuracy_ci95"] = list(bootstrap_balanced_accuracy(y, pred, t["patient"].to_numpy(), bootstrap))
    m["recall_per_class"] = _recalls(m["confusion_matrix"], class_names)
    _write_confusion(m["confusion_matrix"], class_names, out, f"_{name}", f"{name}: {len(t)} pairs")
    return m


def _recalls(cm: list[list[int]], class_names: Sequence[str]) -> dict[str, float | None]:
    cm = np.asarray(cm, dtype=float)
    return {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(class_names)}


def _write_confusion(cm: list[list[int]], class_names: Sequence[str], out: Path, suffix: str, title: str) -> None:
    from ResponseTrainingLib.analysis.plots import plot_confusion

    frame = pd.DataFrame(cm, index=[f"true {c}" for c in class_names], columns=[f"predicted {c}" for c in class_names])
    write_text(frame.to_csv(), out / f"confusion{suffix}.csv")
    plot_confusion(cm, class_names, out / f"confusion{suffix}.png", title)


def explanation_summary(table: pd.DataFrame) -> dict[str, Any] | None:
    """Per map over the pairs that have it: mean (and median) share of energy inside tumour +
    edema, the pointing-game hit rate, and the region's mean share of the brain (chance level)."""
    out: dict[str, Any] = {}
    for m in MAP_NAMES:
        col = f"{m}_energy_inside"
        if col not in table or table[col].isna().all():
            continue
        share = table[col].dropna().astype(float)
        hits = table[f"{m}_peak_inside"].dropna().astype(bool)
        out[m] = {"pairs": int(len(share)), "mean_energy_inside": float(share.mean()),
                  "median_energy_inside": float(share.median()), "pointing_game": float(hits.mean())}
    if not out:
        return None
    out["mean_region_share_of_brain"] = float(table["region_share_of_brain"].dropna().astype(float).mean())
    return out


def evaluate(bundle_path: Path | str | None, data: Path | str, out: Path | str, device: str = "auto",
             workers: int = 1, threads: int = 0, resume: bool = False, fast: bool = False, maps: bool = True,
             segmentation: bool = True, seg_bundle: Path | str | None = None, cache: Path | str | None = None,
             bootstrap: int = 2000) -> dict[str, Any]:
    """Predict every usable pair and write the per-pair predictions, the confusion matrices, the
    reliability diagram and ``metrics.json`` (see the module docstring); returns the metrics."""
    from ResponseTrainingLib.analysis.plots import plot_reliability

    bundle = read_bundle(bundle_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairing = bundle.meta.get("training", {}).get("config", {}).get("pairing", "previous")
    pairs, table = build_pairs(data, bundle.spec.modalities, pairing)  # as the bundle was trained
    write_text(table.to_csv(index=False), out / "pairs.csv")
    options = {"fast": fast, "maps": maps and not fast, "segmentation": segmentation and not fast,
               "seg_bundle": str(seg_bundle) if seg_bundle else None,
               "cache": str(cache or out / "cache"), "key": None}
    options["key"] = json.dumps({"bundle": [w["sha256"] for w in bundle.weights], "fast": fast,
                                 "maps": options["maps"], "segmentation": options["segmentation"],
                                 "seg_bundle": options["seg_bundle"]}, sort_keys=True)
    devices = [d.strip() for d in device.split(",") if d.strip()] or ["auto"]
    records = run_pairs(pairs, bundle.path, out, devices, workers, threads, options, resume)
    names = list(bundle.class_names)
    preds = predictions_table(records, names)
    write_text(preds.to_csv(index=False), out / "predictions.csv")

    y = preds["label"].map(names.index).to_numpy(dtype=int) if len(preds) else np.zeros(0, int)
    proba = preds[[f"p_{c}" for c in names]].to_numpy(dtype=float).reshape(len(preds), len(names))
    raw = preds[[f"p_uncalibrated_{c}" for c in names]].to_numpy(dtype=float).reshape(len(preds), len(names))
    metrics = classification_metrics(y, proba, names)
    metrics["balanced_accuracy_ci95"] = list(bootstrap_balanced_accuracy(
        y, proba.argmax(1) if len(y) else y, preds["patient"].to_numpy() if len(preds) else None, bootstrap))
    metrics["ci_method"] = f"percentile bootstrap over patients ({bootstrap} resamples)"
    metrics["recall_per_class"] = _recalls(metrics["confusion_matrix"], names)
    metrics["ece"] = expected_calibration_error(y, proba)
    metrics["ece_uncalibrated"] = expected_calibration_error(y, raw)
    metrics["calibrated"] = bundle.calibration is not None
    _write_confusion(metrics["confusion_matrix"], names, out, "", f"network: {len(preds)} pairs")
    if len(preds):
        curves = {"calibrated": proba, "network": raw} if bundle.calibration else {"network": proba}
        plot_reliability({"network": (y, curves)}, out / "reliability.png")
        flags = preds["uncertain"].fillna(False).astype(bool).to_numpy()
        right = proba.argmax(1) == y
        metrics["uncertain"] = {"flagged": int(flags.sum()),
                                "accuracy_certain": float(right[~flags].mean()) if (~flags).any() else None,
                                "accuracy_uncertain": float(right[flags].mean()) if flags.any() else None}
    for name in ("measured", "suggested"):
        m = _categorical(name, preds, name, names, out, bootstrap)
        if m is not None:
            metrics[name] = m
    exp = explanation_summary(preds)
    if exp is not None:
        metrics["explanations"] = exp
    metrics.update(bundle=bundle.id, data=str(Path(data).absolute()), mode="fast" if fast else "full",
                   class_counts=preds["label"].value_counts().to_dict() if len(preds) else {})
    write_text(json.dumps(metrics, indent=2) + "\n", out / "metrics.json")
    return metrics
