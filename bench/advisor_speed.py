"""How long a full advisor search takes for a large cluster (target: 1,000 GPUs in under 10 s on 2 CPU cores).

    python bench/advisor_speed.py [--gpus 1000] [--repeats 3] [--no-results]

"Full search" is what ``phaselens advise`` runs: the closed-form screen of every split ``n_P x TP_P : n_D x
TP_D``, every colocated chunk budget and every conditional threshold over the cluster, then the simulated
goodput binary search of the finalists (2 per kind, 2 seeds, 1,000 requests a run), and the decision with its
+-25% robustness checks. The step model is fitted on the H100 8B step records checked in under
tests/fixtures/advisor (the roofline model without them). Wall time from the start of the search to the
verdict; input loading and the fit are timed separately. Appends to bench/RESULTS.md unless ``--no-results``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import click

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.search import Search
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.workload import Workload
from phaselens.engine.config import preset
from phaselens.gpus import gpu_spec
from phaselens.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
STEPS = ROOT / "tests" / "fixtures" / "advisor" / "steps_h100_8b.jsonl"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
WORKLOAD = "rate=400,prompt=lognormal:3000:0.6,output=lognormal:250:0.7,prefix_hit=0.1"


@click.command()
@click.option("--gpus", type=click.IntRange(2), default=1000, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--workload", default=WORKLOAD, show_default=True)
@click.option("--results/--no-results", default=True, show_default=True, help="Append to bench/RESULTS.md.")
def main(gpus: int, repeats: int, workload: str, results: bool) -> None:
    model_cfg = preset("llama-3.1-8b")
    gpu = gpu_spec("NVIDIA H100 80GB HBM3")
    t0 = time.perf_counter()
    if STEPS.exists():
        step_model = StepModel.fit(read_trace(STEPS).steps, model=model_cfg, source=str(STEPS.name))
        model_src = f"fitted on {STEPS.name}"
    else:
        step_model = StepModel.roofline(model_cfg, gpu, (1, 2, 4, 8))
        model_src = "roofline (no step records found)"
    wl = Workload.from_spec(workload)
    t_fit = time.perf_counter() - t0
    slo = Slo(ttft_s=2.0, tpot_s=0.060)
    cluster = Cluster(gpus=gpus, gpu=gpu, model=model_cfg, gpus_per_node=8)
    times = []
    advice = None
    for _ in range(repeats):
        t = time.perf_counter()
        advice = Search(step_model, wl, slo, cluster).run()
        times.append(time.perf_counter() - t)
    assert advice is not None
    cands = len(advice.screen_candidates)
    rec = advice.recommended
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"full search, {gpus} x {gpu.name}, llama-3.1-8b, TP {list(cluster.candidate_tp())}, step model "
        f"{model_src}",
        f"workload {workload}; SLO {slo.describe()}",
        f"search wall time: median {statistics.median(times):.2f} s, min {min(times):.2f} s, max "
        f"{max(times):.2f} s "
        f"over {repeats} runs ({cores} CPU cores); fit and inputs {t_fit:.2f} s",
        f"{cands} screened placements (best per shape), verdict {advice.verdict}"
        + (f" with {rec.placement.label}" if rec else ""),
    ]
    click.echo("\n".join(lines))
    if results:
        cmd = "python bench/advisor_speed.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(f"\n## {_dt.date.today().isoformat()} — advisor search speed (issue 5), CPU\n\n")
            fh.write(
                f"Command: `{cmd}` (machine: {platform.node()}, "
                f"{platform.processor() or platform.machine()}, {cores} cores, shared)\n\n"
            )
            fh.writelines(f"- {ln}\n" for ln in lines)
            fh.write(
                f"- target: under 10 s for 1,000 GPUs on 2 cores: "
                f"{'met' if gpus >= 1000 and max(times) < 10 else 'see figures'}\n"
            )


if __name__ == "__main__":
    main()
