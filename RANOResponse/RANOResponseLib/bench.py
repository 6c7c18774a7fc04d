"""``make bench``: stage timings, peak memory and the cost of the maps on a 1 mm case pair.

Prints medians over ``--runs`` repetitions (after one warm-up) of each stage of ``predict``
with and without attributions, the end-to-end time of the ``rano-response predict`` command
(a fresh process: imports included), the peak resident memory, and the ratios the project
tracks (targets: end to end < 20 s on 2 CPU cores, maps <= 2.5x a prediction), and the tumour
segmentation of both timepoints that predict measures RANO from (target: it adds <= 10 s on 2 CPU
cores, <= 1 s on a GPU).

With ``--head`` (``make bench`` passes pydeface's mean head), one more line: the same command on
the pair as a scanner gives it, an unstripped DICOM pair (full head; 3D T1/CT1 at the bench's
spacing, 5 mm T2/FLAIR, each sequence its own acquisition), so brain extraction, the
within-study registrations and DICOM reading are timed too (target <= 30 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("read", "register", "crop_resample", "inference", "attributions", "segmentation", "measure", "write")


# The predict command, run in a fresh interpreter that reports its own peak resident memory.
# (getrusage's RUSAGE_CHILDREN is no use here: a forked child inherits the parent's high-water
# mark across exec, so it would report the bench's own peak. VmHWM belongs to the new process.)
_CHILD = """import sys
from RANOResponseLib.bench import _peak_mib
from RANOResponseLib.cli import main
rc = main(sys.argv[1:])
print(f"peak_mib {_peak_mib():.1f}", file=sys.stderr)
sys.exit(rc)
"""


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM on Linux, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _predict_command(baseline: Path, followup: Path, work: Path, device: str, runs: int) -> tuple[list[float], list[float]]:
    """Wall times and peak resident memory (MiB) of ``runs`` fresh ``rano-response predict`` processes."""
    times, peaks = [], []
    for _ in range(runs):
        out = Path(tempfile.mkdtemp(dir=work)) / "out"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, "predict", "--baseline", str(baseline),
                               "--followup", str(followup), "--out", str(out), "--device", device, "--quiet"],
                              check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        peaks.extend(float(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("peak_mib "))
        shutil.rmtree(out.parent)
    return times, peaks


def run_bench(runs: int = 3, spacing: float = 1.0, device: str = "auto", workdir: Path | None = None,
              head: Path | None = None) -> int:
    from RANOResponseLib.demo import clinical_case, demo_case
    from RANOResponseLib.inference.pipeline import predict_pair, write_outputs
    from RANOResponseLib.mrml.outputs import output_writers

    work = Path(workdir or Path(tempfile.gettempdir()) / "rano-response-bench")
    baseline, followup, _ = demo_case(work / f"phantom-{spacing:g}mm", spacing=spacing)
    if head is not None:  # the same case pair, unstripped and in DICOM (built before anything is timed)
        dicom_pair = clinical_case(work / f"phantom-{spacing:g}mm", head, ("dicom", "dicom"), spacing=spacing)[:2]
    print(f"bench: {runs} runs (median, after 1 warm-up) on {baseline.parent.name} "
          f"{baseline.name} -> {followup.name}, {spacing:g} mm; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}", flush=True)

    _reset_peak()  # leave the phantom generation out of the figure
    timings: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    totals: dict[bool, list[float]] = {True: [], False: []}
    for i in range(runs + 1):
        for maps in (True, False):
            out = Path(tempfile.mkdtemp(dir=work))
            t0 = time.perf_counter()
            result = predict_pair(baseline, followup, device=device, attributions=maps, notice=lambda m: None)
            write_outputs(result, out, output_writers(pictures=maps))
            wall = time.perf_counter() - t0
            shutil.rmtree(out)
            if i == 0:
                continue  # warm-up: first-call allocations and kernel selection
            totals[maps].append(wall)
            for k, v in result.timings.items():
                timings[maps].setdefault(k, []).append(v)
    peak_inproc = _peak_mib()

    e2e, peaks = _predict_command(baseline, followup, work, device, runs)
    peak_child = max(peaks) if peaks else float("nan")
    dicom_e2e, dicom_peaks = _predict_command(*dicom_pair, work, device, runs) if head is not None else ([], [])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import RANOResponseLib.inference.pipeline"], check=True)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import RANOResponseLib.inference.pipeline, monai.networks.nets"], check=True)
    monai_import = time.perf_counter() - t0 - startup

    dev = result.device
    print(f"\ndevice: {dev}\n")
    print(f"{'stage':16s} {'with maps (s)':>14s} {'no maps (s)':>12s}")
    for k in STAGES:
        a, b = _median(timings[True].get(k, [])), _median(timings[False].get(k, []))
        print(f"{k:16s} {a:14.2f} {b:12.2f}")
    pw, pn = _median(totals[True]), _median(totals[False])
    print(f"{'predict (in-process)':16s} {pw:10.2f} {pn:12.2f}")
    seg, measure = _median(timings[False].get("segmentation", [])), _median(timings[False].get("measure", []))
    rest = pn - seg - measure
    print(f"\nsegmentation (both timepoints): {seg:6.2f} s, measuring RANO from it {measure:.2f} s; "
          f"{(seg + measure) / rest:.2f} x the rest of a prediction without maps ({rest:.2f} s)  "
          "(target <= 10 s on 2 CPU cores, <= 1 s on a GPU)")
    print(f"\nimports (fresh process):         {startup:6.2f} s, MONAI (segmentation network) {monai_import:.2f} s more")
    print(f"rano-response predict end to end: {_median(e2e):6.2f} s  (target < 20 s on 2 CPU cores, < 3 s on a GPU)")
    if head is not None:
        print(f"  unstripped DICOM pair, brain extraction: {_median(dicom_e2e):6.2f} s  (target <= 30 s on 2 CPU "
              f"cores); peak memory {max(dicom_peaks, default=float('nan')):.0f} MiB")
    else:
        print("  unstripped DICOM pair: not timed (give --head HEAD.nii.gz; make bench does)")
    print(f"peak memory (resident): rano-response predict {peak_child:.0f} MiB; "
          f"{2 * runs} predictions in one process {peak_inproc:.0f} MiB")
    model_ratio = (_median(timings[True]["inference"]) + _median(timings[True]["attributions"])) / \
        _median(timings[False]["inference"])
    print(f"\nratio predict with maps / without: {pw / pn:.2f}  (target <= 2.5)")
    print(f"ratio model pass with maps / forward only: {model_ratio:.2f}  (reference study: 7.8)")
    summary = {"device": dev, "runs": runs, "spacing_mm": spacing,
               "stages_with_maps_s": {k: _median(v) for k, v in timings[True].items()},
               "stages_without_maps_s": {k: _median(v) for k, v in timings[False].items()},
               "predict_with_maps_s": pw, "predict_without_maps_s": pn, "ratio": pw / pn,
               "model_ratio": model_ratio, "end_to_end_s": _median(e2e), "imports_s": startup,
               "monai_import_s": monai_import, "segmentation_s": seg, "measure_s": measure,
               "segmentation_ratio": (seg + measure) / rest,
               "end_to_end_dicom_unstripped_s": _median(dicom_e2e) if head is not None else None,
               "peak_rss_mib": {"bench": peak_inproc, "predict_command": peak_child}}
    (work / "bench.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwritten: {work / 'bench.json'}")
    return 0
