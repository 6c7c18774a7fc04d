"""Data-parallel training: ``torchrun --nproc_per_node 2`` on the CPU (gloo) gives the numbers of
one process that splits each batch the same way (``--grad-shards 2``).

Why that comparison: each DDP process takes half of every global batch (``DistributedSampler``
over the epoch's order), the loss is normalised by the global batch's class-weight sum and the
gradients are averaged, so the parameter updates equal the single-process ones exactly; batch
norm, however, normalises each half with its own statistics, which ``--grad-shards 2`` reproduces
in one process. Both run with one torch thread per process (torchrun's default), so even the
floating-point reductions agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_env
from RANOResponseLib.model.bundle import read_bundle
from RANOResponseLib.phantom.generator import PhantomConfig, generate_cohort

ARGS = ["--folds", "2", "--epochs", "2", "--size", "32", "--spacing", "6", "--batch-size", "4", "--seed", "3",
        "--device", "cpu", "--no-augment"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-cohort")
    generate_cohort(root, PhantomConfig(patients=7, seed=11, spacing=4.0, min_followups=2, max_followups=4))
    return root


def _env() -> dict[str, str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(cohort, tmp_path):
    cache = tmp_path / "cache"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--data", str(cohort), "--cache", str(cache), *ARGS]
    res = subprocess.run([sys.executable, "-m", "RANOResponseCLI", "train", "--out", str(single), *common,
                          "--grad-shards", "2"], capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "RANOResponseCLI", "train", "--out", str(ddp), *common, "--progress-json"],
                         capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    events = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert sum(e["event"] == "epoch" for e in events) == 4  # one line per epoch: rank 0 only

    for k in (0, 1):
        h1 = pd.read_csv(single / "folds" / f"fold-{k}" / "history.csv")
        h2 = pd.read_csv(ddp / "folds" / f"fold-{k}" / "history.csv")
        assert len(h1) == len(h2) == 2
        np.testing.assert_allclose(h2[["train_loss", "val_loss"]], h1[["train_loss", "val_loss"]], rtol=1e-5)
    p1, p2 = pd.read_csv(single / "test_predictions.csv"), pd.read_csv(ddp / "test_predictions.csv")
    assert list(p1["pair"]) == list(p2["pair"])
    np.testing.assert_allclose(p2.filter(like="p_"), p1.filter(like="p_"), atol=1e-5)
    assert (pd.read_csv(single / "folds.csv")).equals(pd.read_csv(ddp / "folds.csv"))
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["provenance"]["processes"] == 2 and summary["provenance"]["grad_shards"] == 2
    kept = read_bundle(single / "bundle").meta["ensemble"]["kept"]
    assert read_bundle(ddp / "bundle").meta["ensemble"]["kept"] == kept  # the same members chosen
    assert len(read_bundle(ddp / "bundle").weights) == len(kept)
