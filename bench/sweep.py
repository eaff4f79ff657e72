"""What `reprotune sweep` costs per experiment, against the same experiment run here with `dvc exp run`.

    python bench/sweep.py [--experiments 4]

A tiny project (tests/test_sweep.py's: synthetic data, 320 training images, one epoch, up to
`evaluate`) whose team remotes are a bare git repository and a DVC directory, its baseline pushed.

1. sweep: `reprotune sweep -S train.lr=V1,...,VN evaluate --cpus-per-trial C` (C = this machine's
   cores, so one experiment at a time, as below) on a one-machine Ray cluster, in this process: the
   whole command's seconds, and each experiment's seconds split into its steps (git clone and
   checkout, DVC configuration, the look for an earlier attempt on the remote, `dvc exp run --pull`,
   `dvc exp push`). The first experiment pulls the baseline's data into the node's cache; the others
   find it there.
2. local: `dvc exp run -S train.lr=W evaluate` in the workspace for N other values, one after
   another, with the same torch threads: seconds each.

Overhead per experiment = sweep task seconds - local seconds (median of each); the sweep's own fixed
cost = the command's seconds - its tasks' (Ray's start, planning, the final `dvc exp pull`).
Writes bench/results/sweep.json and bench/results/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures import env, team_project  # noqa: E402 - the tests' tiny team project, the same one
from reprotune.sweep import driver  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def sh(args: list[str], cwd: Path, extra: dict[str, str] | None = None) -> float:
    """Run a command (failing loudly); its wall seconds."""
    start = time.monotonic()
    subprocess.run(args, cwd=cwd, env={**env(), **(extra or {})}, check=True, capture_output=True)
    return time.monotonic() - start


def extra(result: dict) -> float:
    """Seconds of the steps a local `dvc exp run` does not take."""
    return sum(seconds for step, seconds in result["steps"].items() if step != "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=4)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    os.environ.update({k: v for k, v in env().items() if k.startswith("GIT_") or k == "PATH"})
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as top:
        root = team_project(Path(top))
        swept = [f"{0.02 + i / 1000:g}" for i in range(args.experiments)]
        here = [f"{0.03 + i / 1000:g}" for i in range(args.experiments)]  # not the baseline's 0.05
        options = driver.Options([f"train.lr={','.join(swept)}"], ("evaluate",), cpus=cores,
                                 workdir=str(Path(top) / "work"))
        start = time.monotonic()
        results = driver.sweep(root, options, str(Path(sys.executable).parent / "dvc"), env(), say=print)
        sweep_s = time.monotonic() - start
        local = [sh(["dvc", "exp", "run", "-q", "-n", f"local-{v}", "-S", f"train.lr={v}", "evaluate"], root,
                    {"OMP_NUM_THREADS": str(cores)}) for v in here]
    tasks = sorted(results.values(), key=lambda r: r["seconds"], reverse=True)
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores", "experiments": args.experiments,
        "cpus_per_trial": cores, "sweep_seconds": sweep_s, "local_seconds": local,
        "tasks": [{"name": r["name"], "seconds": r["seconds"], "steps": r["steps"]} for r in tasks],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    local_median = statistics.median(local)
    task_median = statistics.median(r["seconds"] for r in tasks)
    fixed = sweep_s - sum(r["seconds"] for r in tasks)
    each_task = ", ".join(f"{r['seconds']:.1f}" for r in tasks)
    each_run = ", ".join(f"{r['steps']['run']:.1f}" for r in tasks)
    steps = sorted({step for r in tasks for step in r["steps"]}, key=list(tasks[0]["steps"]).index)
    lines = [
        "# Sweep overhead per experiment",
        "",
        f"`python bench/sweep.py --experiments {args.experiments}` on {record['machine']}, no GPU; the tiny "
        f"project of tests/test_sweep.py up to `evaluate`, one experiment at a time (`--cpus-per-trial "
        f"{cores}`, and `OMP_NUM_THREADS={cores}` for the local runs).",
        "",
        f"- local `dvc exp run -S train.lr=... evaluate`: median {local_median:.1f} s "
        f"({', '.join(f'{s:.1f}' for s in local)})",
        f"- the sweep's experiments: median {task_median:.1f} s "
        f"({each_task}): **{task_median - local_median:+.1f} s per "
        f"experiment** ({task_median / local_median:.2f}x)",
        f"- the steps a local run does not take (clone, checkout, the look for an earlier attempt on the remote, "
        f"push): median {statistics.median(extra(r) for r in tasks):.1f} s per experiment; the rest is the "
        f"`dvc exp run --pull` itself, {each_run} s against the local runs' {', '.join(f'{s:.1f}' for s in local)}",
        f"- the whole `reprotune sweep` command: {sweep_s:.1f} s for {args.experiments} experiments, "
        f"{fixed:.1f} s of it outside the experiments (Ray's start, planning, the final `dvc exp pull`)",
        "",
        "| experiment | seconds | " + " | ".join(steps) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in steps) + " |",
        *(f"| {r['name']} | {r['seconds']:.1f} | " + " | ".join(f"{r['steps'].get(step, 0):.1f}" for step in steps)
          + " |" for r in tasks),
    ]
    (RESULTS / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
