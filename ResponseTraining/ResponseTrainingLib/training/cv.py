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
5. Deep hybrid classifiers on the fold models' probabilities plus clinical features
   (:mod:`.hybrid`), inside the same folds.
6. Metrics per fold and summarised (``metrics.csv``, ``summary.json``), PNG plots, and the k
   fold models exported as one ensemble bundle with its model card (:mod:`.card`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

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

from ResponseTrainingLib.analysis.metrics import SCALAR_METRICS, classification_metrics, summarise
from ResponseTrainingLib.data.dataset import cache_pairs, cached_dataset, input_statistics
from ResponseTrainingLib.data.labels import apply_review_labels
from ResponseTrainingLib.training.card import fmt, json_default, model_card, provenance
from ResponseTrainingLib.training.config import TrainConfig
from ResponseTrainingLib.training.folds import FoldPlan, folds_table, make_folds
from ResponseTrainingLib.training.hybrid import fit_predict
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
    if cfg.clinical or cfg.hybrid:
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
                                                       "frac": 0.1 * i / n}), device=device)
    dctx.barrier()
    if not dctx.main:
        paths = cache_pairs(pairs, spec, cache, progress=False)
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
                        time.perf_counter() - t_start, input_statistics(paths))
    emit({"event": "done", "summary": str(out / "summary.json"), "bundle": str(out / "bundle"), "frac": 1.0})
    return summary


# ------------------------------------------------------------------------------ aggregation

def _fold_predictions(out: Path, k: int) -> pd.DataFrame:
    """Fold ``k``'s ``predictions.csv``: its model's probabilities for its val and test pairs."""
    return pd.read_csv(out / "folds" / f"fold-{k}" / "predictions.csv")


def _proba(df: pd.DataFrame) -> np.ndarray:
    """The ``p_<class>`` columns as an (n, classes) array."""
    return df[[f"p_{c}" for c in CLASS_NAMES]].to_numpy(dtype=float)


def run_hybrid(cfg: TrainConfig, out: Path, n_folds: int, clinical: pd.DataFrame) -> dict[str, Any]:
    """Per fold and classifier: fit on the fold's validation (or training + validation) pairs'
    CNN probabilities + clinical features, score the test fold. Returns per-fold metrics and
    pooled test predictions per classifier."""
    results: dict[str, dict[str, Any]] = {}
    fit_roles = ("val",) if cfg.hybrid_fit == "val" else ("train", "val")
    for name in cfg.hybrid:
        per_fold, pooled = [], []
        for k in range(n_folds):
            pred = _fold_predictions(out, k)
            feats = clinical.loc[pred["pair"], list(CLINICAL_FEATURES)].to_numpy(dtype=float)
            x = np.hstack([_proba(pred), feats])
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


def aggregate(cfg: TrainConfig, out: Path, plan: FoldPlan, records: dict[int, dict[str, Any]], pairs: list,
              labels: np.ndarray, clinical: pd.DataFrame | None, device: torch.device, dctx: DistContext,
              seconds: float, statistics: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.csv, summary.json, plots and the ensemble bundle from the finished folds;
    ``statistics``: the training inputs' ``input_statistics`` for the bundle."""
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
    if cfg.hybrid and clinical is not None:
        models.update(run_hybrid(cfg, out, K, clinical))
        hyb = pd.concat([v["pooled"].assign(model=n) for n, v in models.items() if n != "cnn"], ignore_index=True)
        write_text(hyb.to_csv(index=False), out / "hybrid_predictions.csv")

    rows, cv = [], {}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
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
    summary = {"cv": cv, "provenance": prov}
    write_text(json.dumps(summary, indent=2, default=json_default) + "\n", out / "summary.json")

    spec = cfg.spec()
    args = network_args(cfg, len(spec.channels))
    states = [torch.load(out / "folds" / f"fold-{k}" / "best.pt", map_location="cpu", weights_only=True)
              for k in range(K)]
    short_cv = {name: {s: v[s] for s in ("median", "mean", "sd", "pooled", "folds")} for name, v in cv.items()}
    write_bundle(out / "bundle", bundle_id=cfg.bundle_id, architecture={"name": cfg.arch, "args": args},
                 spec=spec, state_dicts=states, gradcam_layer=GRADCAM_LAYERS[cfg.arch],
                 extra=json.loads(json.dumps({"training": prov,
                                              "metrics": {"cv": short_cv, "holdout_test": cv["cnn"]["pooled"]}},
                                             default=json_default)),
                 model_card=model_card(cfg, prov, cv), input_statistics=statistics)
    c = cv["cnn"]
    say_line = (f"CV ({plan.scheme}): balanced accuracy median {c['median']['balanced_accuracy']:.3f}, "
                f"mean {c['mean']['balanced_accuracy']:.3f} ± {fmt(c['sd']['balanced_accuracy'])}; "
                f"macro F1 median {c['median']['f1_macro']:.3f}\nbundle: {out / 'bundle'} ({K} models)")
    print(say_line, file=sys.stderr, flush=True)
    return summary
