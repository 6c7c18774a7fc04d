"""Cross-validated training of response classifiers, exported as one ensemble bundle.

The plan of a run (``rano-response train``):

1. Read LUMIERE as distributed and pair follow-ups with baselines
   (:mod:`RANOResponseLib.datasets.lumiere`); ``pairs.csv`` lists every rating row, used or
   skipped and why.
2. Split the pairs by patient (:mod:`.folds`); ``folds.csv`` records each pair's (hence
   patient's) test fold and the folds it validates.
3. Preprocess every pair once with the clinical path (:mod:`ResponseTrainingLib.data`), shared by
   all folds; the pairs' descriptions become the bundle's ``input_statistics`` (input guard).
4. Train one network per fold (:mod:`.loop`); a run restarted with ``--resume`` skips finished
   folds and continues the current one from its last epoch.
5. Calibration: each fold model's temperature and the "uncertain" thresholds, fitted on
   validation patients (:mod:`ResponseTrainingLib.analysis.calibration`); ECE and reliability
   diagrams on the test folds.
6. Deep hybrid classifiers on the fold models' probabilities plus clinical features
   (:mod:`.hybrid`), inside the same folds; ``suggested`` (calibrated probabilities + measured
   RANO category) also fitted on all folds' validation pairs for the bundle.
7. Metrics per fold and summarised (``metrics.csv``, ``summary.json``), PNG plots, and the k
   fold models exported as one ensemble bundle with its model card (:mod:`.card`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.core.files import write_text
from RANOResponseLib.core.names import CLASS_NAMES
from RANOResponseLib.datasets.lumiere import (
    CLINICAL_FEATURES,
    build_pairs,
    clinical_features,
    print_pair_table,
    read_clinical,
)
from RANOResponseLib.model.bundle import write_bundle
from RANOResponseLib.model.networks import GRADCAM_LAYERS

from ResponseTrainingLib.analysis.calibration import calibrate_folds, expected_calibration_error, proba_of
from ResponseTrainingLib.analysis.metrics import SCALAR_METRICS, classification_metrics, summarise
from ResponseTrainingLib.data.dataset import cache_pairs, cached_dataset, input_statistics, measured_from_cache
from ResponseTrainingLib.data.labels import apply_review_labels
from ResponseTrainingLib.training.card import fmt, json_default, model_card, provenance
from ResponseTrainingLib.training.config import TrainConfig
from ResponseTrainingLib.training.folds import FoldPlan, folds_table, make_folds
from ResponseTrainingLib.training.hybrid import (
    fit_model,
    fit_predict,
    measured_from_cohort_masks,
    suggestion_feature_names,
    suggestion_features,
    suggestion_json,
)
from ResponseTrainingLib.training.loop import (
    DistContext,
    FoldData,
    finished_fold,
    init_distributed,
    network_args,
    train_fold,
)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary also written to ``out/summary.json`` (an empty
    dict for ``--only-fold`` / ``--preprocess-only`` runs, which leave aggregation to a final
    ``--resume`` run)."""
    cfg.check()
    dctx, device = init_distributed(cfg.device)
    try:
        return _run(cfg, dctx, device)
    finally:
        if dctx.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(cfg: TrainConfig, dctx: DistContext, device: torch.device) -> dict[str, Any]:
    """Steps 1-6 of the module docstring in this process (rank ``dctx.rank`` of a DDP group)."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if dctx.main else (lambda m: None)

    def emit(event: dict[str, Any]) -> None:
        if dctx.main and cfg.progress_json:
            print(json.dumps(event, default=float), flush=True)

    spec = cfg.spec()
    pairs, table = build_pairs(cfg.data, cfg.modalities, cfg.pairing)
    if cfg.labels:
        pairs, table = apply_review_labels(pairs, table, cfg.labels, cfg.data, cfg.modalities)
    if dctx.main:
        write_text(table.to_csv(index=False), out / "pairs.csv")
        print_pair_table(table)
    labels = np.array([CLASS_NAMES.index(p.label) for p in pairs], dtype=int)
    groups = np.array([p.patient for p in pairs])
    pair_ids = [p.id for p in pairs]
    n_patients = len(set(groups.tolist()))
    if len(pairs) < 4 or n_patients < 3:
        raise RANOInputError(f"{cfg.data}: only {len(pairs)} usable pairs from {n_patients} patients; "
                             "need at least 4 pairs from 3 patients")
    clinical = None
    if cfg.clinical or set(cfg.hybrid) - {"suggested"}:  # the suggestion uses clinical data only with --clinical
        clinical = clinical_features(pairs, read_clinical(cfg.data))
        if dctx.main:
            write_text(clinical.rename_axis("pair").to_csv(), out / "clinical.csv")

    plan = make_folds(labels, groups, cfg.folds, cfg.loocv, cfg.val_fraction, cfg.seed)
    if dctx.main:
        write_text(folds_table(plan, pair_ids, groups, [p.label for p in pairs]).to_csv(index=False),
                   out / "folds.csv")
    say(f"{plan.scheme}: {len(pairs)} pairs from {n_patients} patients; folds.csv written")
    fold_ids = list(range(plan.n_folds)) if cfg.only_fold is None else [cfg.only_fold]
    if cfg.only_fold is not None and not 0 <= cfg.only_fold < plan.n_folds:
        raise RANOInputError(f"--only-fold {cfg.only_fold}: folds are 0..{plan.n_folds - 1}")
    emit({"event": "start", "pairs": len(pairs), "patients": n_patients, "folds": plan.n_folds,
          "run_folds": fold_ids, "epochs": cfg.epochs, "frac": 0.0})

    # preprocessing: once per cohort and input spec, shared by the folds (process 0 writes it)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    if dctx.main:
        paths = cache_pairs(pairs, spec, cache, progress=True,
                            on_pair=lambda i, n: emit({"event": "preprocess", "done": i, "total": n,
                                                       "frac": 0.1 * i / n}), device=device,
                            seg_bundle=cfg.seg_bundle)
    dctx.barrier()
    if not dctx.main:
        paths = cache_pairs(pairs, spec, cache, progress=False, seg_bundle=cfg.seg_bundle)
    if cfg.preprocess_only:
        say(f"preprocessed {len(paths)} pairs into {cache}")
        return {}
    dataset = cached_dataset(paths, labels)

    def frac(fold: int, within: float) -> float:
        pos = fold_ids.index(fold)
        return 0.1 + 0.9 * (pos + within) / len(fold_ids)

    key = cfg.result_key()
    records: dict[int, dict[str, Any]] = {}
    for k in fold_ids:
        fold_dir = out / "folds" / f"fold-{k}"
        rec = finished_fold(fold_dir, key) if cfg.resume else None
        if rec is not None:
            say(f"fold {k}: finished earlier (best epoch {rec['best_epoch']}); skipped")
            emit({"event": "fold", "fold": k, "skipped": True, "frac": frac(k, 1.0)})
        else:
            train_idx, val_idx, test_idx = plan.indices(k)
            rec = train_fold(cfg, FoldData(k, train_idx, val_idx, test_idx), dataset, labels, pair_ids, device,
                             dctx, fold_dir, emit, frac)
        records[k] = rec

    if cfg.only_fold is not None:
        say(f"fold {cfg.only_fold} done; run again with --resume (without --only-fold) to aggregate")
        return {}
    if not dctx.main:
        return {}
    summary = aggregate(cfg, out, plan, records, pairs, labels, clinical, device, dctx,
                        time.perf_counter() - t_start, input_statistics(paths), paths)
    emit({"event": "done", "summary": str(out / "summary.json"), "bundle": str(out / "bundle"), "frac": 1.0})
    return summary


# ------------------------------------------------------------------------------ aggregation

def _fold_predictions(out: Path, k: int) -> pd.DataFrame:
    """Fold ``k``'s ``predictions.csv``: its model's probabilities for its val and test pairs."""
    return pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv")


def _proba(df: pd.DataFrame) -> np.ndarray:
    """The ``p_<class>`` columns as an (n, classes) array."""
    return df[[f"p_{c}" for c in CLASS_NAMES]].to_numpy(dtype=float)


def _hybrid_inputs(name: str, pred: pd.DataFrame, clinical: pd.DataFrame | None,
                   measured: dict[str, str | None] | None, use_clinical: bool) -> np.ndarray:
    """Classifier ``name``'s features for the rows of a fold's predictions: CNN probabilities +
    clinical features; for ``suggested`` (``pred`` calibrated) + the measured category."""
    feats = (clinical.loc[pred["pair"], list(CLINICAL_FEATURES)].to_numpy(dtype=float)
             if clinical is not None else None)
    if name == "suggested":
        return suggestion_features(_proba(pred), [(measured or {}).get(p) for p in pred["pair"]],
                                   feats if use_clinical else None)
    return np.hstack([_proba(pred), feats])


def run_hybrid(cfg: TrainConfig, out: Path, n_folds: int, clinical: pd.DataFrame | None,
               calibrated: dict[int, pd.DataFrame], measured: dict[str, str | None] | None) -> dict[str, Any]:
    """Per fold and classifier: fit on the fold's validation (or training + validation) pairs'
    CNN probabilities + clinical features (``suggested``: calibrated probabilities + measured
    category [+ clinical features with ``--clinical``]), score the test fold. Returns per-fold
    metrics and pooled test predictions per classifier."""
    results: dict[str, dict[str, Any]] = {}
    fit_roles = ("val",) if cfg.hybrid_fit == "val" else ("train", "val")
    for name in cfg.hybrid:
        per_fold, pooled = [], []
        for k in range(n_folds):
            pred = calibrated[k] if name == "suggested" else _fold_predictions(out, k)
            x = _hybrid_inputs(name, pred, clinical, measured, cfg.clinical)
            fit = pred["role"].isin(fit_roles).to_numpy()
            test = (pred["role"] == "test").to_numpy()
            y = pred["label"].to_numpy(dtype=int)
            try:
                p = fit_predict(name, x[fit], y[fit], x[test], len(CLASS_NAMES), seed=cfg.seed + k)
                m = classification_metrics(y[test], p)
            except ValueError as e:  # e.g. one class only among the fitting pairs
                m = {**classification_metrics(np.zeros(0, int), np.zeros((0, len(CLASS_NAMES)))), "note": str(e)}
                p = np.full((int(test.sum()), len(CLASS_NAMES)), np.nan)
            m["fold"] = k
            per_fold.append(m)
            pooled.append(pd.DataFrame({"pair": pred["pair"][test].values, "fold": k, "label": y[test],
                                        **{f"p_{c}": p[:, i] for i, c in enumerate(CLASS_NAMES)}}))
        results[f"hybrid-{name}"] = {"per_fold": per_fold, "pooled": pd.concat(pooled, ignore_index=True)}
    return results


def _calibrate(out: Path, n_folds: int, plots: Path) -> dict[str, Any]:
    """Temperatures and "uncertain" thresholds from the folds' validation pairs
    (:func:`~ResponseTrainingLib.analysis.calibration.calibrate_folds`); ``calibration.csv``, the
    calibrated test predictions and the reliability diagrams (pooled and per fold)."""
    from ResponseTrainingLib.analysis.plots import plot_reliability

    cal = calibrate_folds({k: _fold_predictions(out, k) for k in range(n_folds)})
    write_text(pd.DataFrame(cal["per_fold"]).to_csv(index=False), out / "calibration.csv")
    test = pd.concat([df[df["role"] == "test"].assign(fold=k) for k, df in cal["calibrated"].items()],
                     ignore_index=True)
    write_text(test.to_csv(index=False), out / "test_predictions_calibrated.csv")
    y = test["label"].to_numpy(dtype=int)
    raw, calibrated = proba_of(test, prefix="raw_p_"), proba_of(test)
    cal["ece_test_pooled"] = {"uncalibrated": expected_calibration_error(y, raw),
                              "calibrated": expected_calibration_error(y, calibrated)}
    plot_reliability({"pooled test folds": (y, {"network": raw, "calibrated": calibrated})},
                     plots / "reliability_cnn.png")
    panels = {}
    for k, df in cal["calibrated"].items():
        t = df[df["role"] == "test"]
        panels[f"fold {k} test (T={cal['temperatures'][k]:.2f})"] = (
            t["label"].to_numpy(dtype=int), {"network": proba_of(t, prefix="raw_p_"), "calibrated": proba_of(t)})
    plot_reliability(panels, plots / "reliability_folds.png")
    return cal


def _measured_model(calibrated: dict[int, pd.DataFrame], measured: dict[str, str | None]) -> dict[str, Any]:
    """The measured category (cohort masks) scored like a model on each test fold: one-hot
    "probabilities"; pairs without a measured category are left out."""
    per_fold, pooled = [], []
    for k, df in calibrated.items():
        t = df[(df["role"] == "test") & df["pair"].map(lambda p: measured.get(p) in CLASS_NAMES)]
        onehot = np.array([[1.0 if measured[p] == c else 0.0 for c in CLASS_NAMES] for p in t["pair"]])
        onehot = onehot.reshape(len(t), len(CLASS_NAMES))
        m = classification_metrics(t["label"].to_numpy(dtype=int), onehot)
        m["fold"] = k
        per_fold.append(m)
        pooled.append(pd.DataFrame({"pair": t["pair"].values, "fold": k, "label": t["label"].values,
                                    **{f"p_{c}": onehot[:, i] for i, c in enumerate(CLASS_NAMES)}}))
    return {"per_fold": per_fold, "pooled": pd.concat(pooled, ignore_index=True)}


def _suggestion_model(cfg: TrainConfig, calibrated: dict[int, pd.DataFrame], measured: dict[str, str | None],
                      clinical: pd.DataFrame | None, cv: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``suggested`` model for the bundle: fitted on every fold's validation pairs (each with
    its own fold model's calibrated probabilities: what the ensemble gives for unseen patients)
    and the measured category; None when those pairs hold fewer than two classes."""
    val = pd.concat([df[df["role"] == "val"] for df in calibrated.values()], ignore_index=True)
    x = _hybrid_inputs("suggested", val, clinical, measured, cfg.clinical)
    try:
        model = fit_model("suggested", x, val["label"].to_numpy(dtype=int), seed=cfg.seed)
    except ValueError as e:
        print(f"suggested category: not fitted for the bundle ({e})", file=sys.stderr, flush=True)
        return None
    figures = {}
    if cv:  # how the same recipe scored on the test folds (one model per fold)
        figures = {"folds": cv["folds"], "median_balanced_accuracy": cv["median"]["balanced_accuracy"],
                   "mean_balanced_accuracy": cv["mean"]["balanced_accuracy"],
                   "pooled_balanced_accuracy": cv["pooled"]["balanced_accuracy"]}
    return suggestion_json(model, suggestion_feature_names(cfg.clinical), CLASS_NAMES,
                           fitted_on=f"validation pairs of all folds ({len(val)} rows, each with its fold model's "
                                     "calibrated probabilities); measured category from the cohort's own masks",
                           cv=json.loads(json.dumps(figures, default=json_default)))


def _metrics_rows(model: str, per_fold: list[dict[str, Any]], summ: dict[str, Any],
                  pooled: dict[str, Any]) -> list[dict[str, Any]]:
    """``metrics.csv`` rows of one model: per fold, median / mean / sd, pooled."""
    rows = []
    for m in per_fold:
        rows.append({"model": model, "fold": str(m["fold"]), "n": m["n"], **{s: m[s] for s in SCALAR_METRICS},
                     "confusion_matrix": json.dumps(m["confusion_matrix"])})
    for stat in ("median", "mean", "sd"):
        rows.append({"model": model, "fold": stat, "n": "", **summ[stat], "confusion_matrix": ""})
    rows.append({"model": model, "fold": "pooled", "n": pooled["n"], **{s: pooled[s] for s in SCALAR_METRICS},
                 "confusion_matrix": json.dumps(pooled["confusion_matrix"])})
    return rows


# A fold model joins the shipped ensemble only if, at its chosen epoch, its balanced accuracy on
# its own validation patients beats chance (1 / classes) by this margin: decided on validation data
# only (the test folds never choose), so a member stuck at chance (issue 12: one of v2's three
# kept epoch 1) cannot flatten the ensemble's probabilities.
MEMBER_MARGIN = 0.10


def ensemble_members(records: dict[int, dict[str, Any]], n_classes: int,
                     margin: float = MEMBER_MARGIN) -> dict[str, Any]:
    """Which fold models the bundle ships (see :data:`MEMBER_MARGIN`): ``kept``, ``left_out``,
    the rule and each fold's validation balanced accuracy. If no fold passes, all are kept (and
    the rule says so)."""
    chance = 1.0 / n_classes
    val = {k: float(r.get("val_balanced_accuracy", r.get("val_best_score", 0.0))) for k, r in sorted(records.items())}
    kept = [k for k, v in val.items() if v >= chance + margin]
    rule = f"validation balanced accuracy at the chosen epoch >= chance ({chance:.2f}) + {margin:.2f}"
    if not kept:
        kept, rule = list(val), rule + "; no fold passed, all kept"
    return {"kept": kept, "left_out": [k for k in val if k not in kept], "rule": rule,
            "val_balanced_accuracy": {str(k): round(v, 4) for k, v in val.items()}}


def aggregate(cfg: TrainConfig, out: Path, plan: FoldPlan, records: dict[int, dict[str, Any]], pairs: list,
              labels: np.ndarray, clinical: pd.DataFrame | None, device: torch.device, dctx: DistContext,
              seconds: float, statistics: dict[str, Any] | None = None,
              paths: Sequence[Path] | None = None) -> dict[str, Any]:
    """metrics.csv, summary.json, plots and the ensemble bundle from the finished folds;
    ``statistics``: the training inputs' ``input_statistics`` for the bundle; ``paths``: the
    cached pairs (their descriptions hold the automatic measured category, when segmented)."""
    from ResponseTrainingLib.analysis.plots import plot_confusion, plot_learning_curves, plot_roc

    K = plan.n_folds
    models: dict[str, dict[str, Any]] = {}
    cnn_fold = []
    pooled_cnn = []
    for k in range(K):
        m = dict(records[k]["test"])
        m["fold"] = k
        cnn_fold.append(m)
        pred = _fold_predictions(out, k)
        pooled_cnn.append(pred[pred["role"] == "test"].assign(fold=k))
    pooled_cnn_df = pd.concat(pooled_cnn, ignore_index=True)
    write_text(pooled_cnn_df.to_csv(index=False), out / "test_predictions.csv")
    models["cnn"] = {"per_fold": cnn_fold, "pooled": pooled_cnn_df}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    calibration = _calibrate(out, K, plots)
    measured = None
    if "suggested" in cfg.hybrid:
        # The automatic segmentations' category where the network's input holds them (what predict
        # will give the suggestion), else the cohort's own masks (optimistic: see hybrid.py).
        measured = measured_from_cache(paths) if paths is not None else None
        name = "measured-automatic"
        if measured is None:
            measured = measured_from_cohort_masks(pairs, Path(cfg.cache) if cfg.cache else out / "cache")
            name = "measured-cohort-masks"
        models[name] = _measured_model(calibration["calibrated"], measured)
    if cfg.hybrid:
        models.update(run_hybrid(cfg, out, K, clinical, calibration["calibrated"], measured))
        hyb = pd.concat([v["pooled"].assign(model=n) for n, v in models.items() if n != "cnn"], ignore_index=True)
        write_text(hyb.to_csv(index=False), out / "hybrid_predictions.csv")

    rows, cv = [], {}
    for name, res in models.items():
        pooled_df = res["pooled"].dropna(subset=[f"p_{c}" for c in CLASS_NAMES])
        pooled = classification_metrics(pooled_df["label"].to_numpy(dtype=int), _proba(pooled_df))
        summ = summarise(res["per_fold"])
        cv[name] = {**summ, "pooled": pooled, "per_fold": res["per_fold"]}
        rows += _metrics_rows(name, res["per_fold"], summ, pooled)
        plot_confusion(pooled["confusion_matrix"], CLASS_NAMES, plots / f"confusion_{name}.png",
                       f"{name}: pooled test folds (n={pooled['n']})")
        plot_roc(pooled_df["label"].to_numpy(dtype=int), _proba(pooled_df), CLASS_NAMES, plots / f"roc_{name}.png",
                 f"{name}: one-vs-rest ROC, pooled test folds")
    write_text(pd.DataFrame(rows).to_csv(index=False), out / "metrics.csv")
    histories = {k: pd.read_csv(out / "folds" / f"fold-{k}" / "history.csv") for k in range(K)
                 if (out / "folds" / f"fold-{k}" / "history.csv").is_file()}
    plot_learning_curves(histories, plots / "learning_curves.png")

    prov = provenance(cfg, plan, records, pairs, labels, device, dctx, seconds)
    cal_block = {"method": "temperature", "temperatures": calibration["temperatures"],
                 "uncertain": calibration["uncertain"], "per_fold": calibration["per_fold"],
                 "ece_test_pooled": calibration["ece_test_pooled"],
                 "fitted_on": "each fold model's validation patients"}
    summary = {"cv": cv, "calibration": cal_block, "provenance": prov}
    extra: dict[str, Any] = {"calibration": cal_block}
    if "suggested" in cfg.hybrid:
        summary["suggestion"] = extra["suggestion"] = _suggestion_model(cfg, calibration["calibrated"], measured,
                                                                        clinical, cv.get("hybrid-suggested"))
    write_text(json.dumps(summary, indent=2, default=json_default) + "\n", out / "summary.json")

    spec = cfg.spec()
    args = network_args(cfg, len(spec.channels))
    members = ensemble_members(records, len(CLASS_NAMES))
    if len(members["kept"]) < K:
        print(f"ensemble: folds {members['left_out']} left out ({members['rule']})", file=sys.stderr, flush=True)
    extra["calibration"] = {**cal_block, "temperatures": [cal_block["temperatures"][k] for k in members["kept"]]}
    extra["ensemble"] = members
    states = [torch.load(out / "folds" / f"fold-{k}" / "best.pt", map_location="cpu", weights_only=True)
              for k in members["kept"]]
    short_cv = {name: {s: v[s] for s in ("median", "mean", "sd", "pooled", "folds")} for name, v in cv.items()}
    write_bundle(out / "bundle", bundle_id=cfg.bundle_id, architecture={"name": cfg.arch, "args": args},
                 spec=spec, state_dicts=states, gradcam_layer=GRADCAM_LAYERS[cfg.arch],
                 extra=json.loads(json.dumps({"training": prov,
                                              "metrics": {"cv": short_cv, "holdout_test": cv["cnn"]["pooled"]},
                                              **{k: v for k, v in extra.items() if v is not None}},
                                             default=json_default)),
                 model_card=model_card(cfg, prov, cv, cal_block, members), input_statistics=statistics)
    c = cv["cnn"]
    say_line = (f"CV ({plan.scheme}): balanced accuracy median {c['median']['balanced_accuracy']:.3f}, "
                f"mean {c['mean']['balanced_accuracy']:.3f} ± {fmt(c['sd']['balanced_accuracy'])}; "
                f"macro F1 median {c['median']['f1_macro']:.3f}\nbundle: {out / 'bundle'} ({len(states)} models)")
    print(say_line, file=sys.stderr, flush=True)
    return summary
