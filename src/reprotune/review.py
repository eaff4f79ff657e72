"""`reprotune review BASE`: what changed against a git revision, as Markdown for a pull request.

Three sections, from DVC's own diffs: the params that differ (`dvc params diff`), the metrics with
the headline ones first and always shown (`dvc metrics diff`), and which plots changed, with
`dvc plots diff` rendered to a folder for the reviewer to open. A GitHub Actions workflow
(.github/workflows/pull-request.yml) posts it on every pull request.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from reprotune.errors import ReprotuneError

# The numbers a reviewer reads first: quality, speed, and whether the shipped files match PyTorch.
HEADLINE = [
    ("metrics/train.json", "best_val_acc"),
    ("metrics/evaluate.json", "test_acc"),
    ("metrics/evaluate.json", "macro_f1"),
    ("metrics/train.json", "images_per_second"),
    ("metrics/export.json", "parity"),  # the worst fp32 export's max |logit difference| from PyTorch
    ("metrics/export.json", "int8_agree"),
]


# params.yaml's top level
PARAM_SECTIONS = ["seed", "data", "model", "train", "log", "evaluate", "compress", "export", "monitor"]


def headline_view() -> list[str]:
    """`dvc exp show` options for the headline view: every experiment's name, the params that differ
    and the headline metrics (kept even when equal), and nothing else: no other metric, no deps."""
    names = "|".join(re.escape(key) for _, key in HEADLINE)
    sections = "|".join(PARAM_SECTIONS)
    return ["--only-changed", "--keep", f"^({names})$",
            "--drop", rf"^(?!({names})$)(?!({sections})(\.|$))(?!(Experiment|State|Executor)$)"]


def dvc_json(dvc: str, args: Sequence[str], env: dict[str, str]) -> dict:
    """Run `dvc <args> --json`; its parsed output, or one line saying why not."""
    proc = subprocess.run([dvc, *args, "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise ReprotuneError(f"dvc {' '.join(args)} failed: {last}")
    return json.loads(proc.stdout or "{}")


def review(dvc: str, base: str, plots_dir: Path, env: dict[str, str]) -> str:
    """The Markdown report of the workspace against `base`."""
    params = dvc_json(dvc, ["params", "diff", base], env)
    metrics = dvc_json(dvc, ["metrics", "diff", base, "--all"], env)
    plots = dvc_json(dvc, ["plots", "diff", base], env)
    rendered = subprocess.run([dvc, "plots", "diff", base, "-o", str(plots_dir)], capture_output=True, text=True,
                              env=env)
    lines = [f"## reprotune review: workspace against `{base}`", ""]
    lines += _params_section(params, base)
    lines += _metrics_section(metrics, base)
    lines += _plots_section(plots, plots_dir if rendered.returncode == 0 else None)
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _params_section(diff: dict, base: str) -> list[str]:
    rows = [(path, key, change) for path, changes in diff.items() for key, change in changes.items()]
    lines = ["### Params", ""]
    if not rows:
        return [*lines, f"No params differ from `{base}`.", ""]
    lines += [f"| param | `{base}` | workspace |", "| --- | ---: | ---: |"]
    lines += [f"| `{key}` | {_cell(change.get('old'))} | {_cell(change.get('new'))} |" for _, key, change in rows]
    return [*lines, ""]


def _metrics_section(diff: dict, base: str) -> list[str]:
    lines = ["### Metrics", "", f"| metric | `{base}` | workspace | change |", "| --- | ---: | ---: | ---: |"]

    def row(path: str, key: str, change: dict) -> str:
        return f"| `{key}` | {_cell(change.get('old'))} | {_cell(change.get('new'))} | {_cell(change.get('diff'))} |"

    headline = set(HEADLINE)
    for path, key in HEADLINE:  # always shown, changed or not
        lines.append(row(path, key, diff.get(path, {}).get(key, {})))
    rest = [(path, key, change) for path, changes in diff.items() for key, change in changes.items()
            if (path, key) not in headline and change.get("old") != change.get("new")]
    if rest:
        lines += ["", "<details><summary>Other metrics that changed</summary>", "",
                  f"| metric | `{base}` | workspace | change |", "| --- | ---: | ---: | ---: |"]
        lines += [row(path, f"{Path(path).stem}: {key}", change) for path, key, change in rest]
        lines += ["", "</details>"]
    return [*lines, ""]


def _plots_section(plots: dict, rendered: Path | None) -> list[str]:
    """Which plots differ between the revisions (their data points, compared per revision)."""
    changed = []
    for name, entries in plots.get("data", {}).items():
        by_rev: dict[str, list] = {}
        for entry in entries:
            for point in entry.get("content", {}).get("data", {}).get("values", []):
                rev = point.get("rev")
                by_rev.setdefault(rev, []).append({k: v for k, v in point.items() if k not in ("rev", "filename")})
        if len({json.dumps(points, sort_keys=True) for points in by_rev.values()}) > 1:
            changed.append(name)
    lines = ["### Plots", ""]
    lines.append(f"Changed: {', '.join(changed)}." if changed else "No plot changed.")
    if rendered is not None:
        lines.append(f"All plots, both revisions overlaid: `{rendered / 'index.html'}`.")
    return [*lines, ""]
