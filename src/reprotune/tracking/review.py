"""`reprotune review BASE`: what changed against a git revision, as Markdown for a pull request;
and `reprotune experiments --seeds`: the spread of the headline metrics over seeds.

Four review sections, from DVC's own diffs: the params that differ (`dvc params diff`), the
metrics with the headline ones first and always shown (`dvc metrics diff`), the timing figures apart
(machine-dependent: a move under SPEED_NOISE either way is called noise), and which plots changed,
with `dvc plots diff` rendered to a folder for the reviewer to open. A GitHub Actions workflow
(.github/workflows/pull-request.yml) posts it on every pull request. When the workspace's params
were also run with other seeds, a fifth section shows the seed spread, so that a reviewer can tell
a gain from seed noise.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


# Figures that time something (by the last part of their key): they move with the machine and its load,
# not only with the change under review, and the base's were often measured on another machine. The
# review shows them apart, under "Speed", never among the metrics that changed.
TIMING_KEYS = ("latency_ms", "images_per_second", "speedup", "train_seconds", "achieved_tflops", "seconds")
# A timing figure counts as changed only beyond this ratio, either way: the same export's TorchScript
# latency ranged 4.7 to 8.6 ms in three runs on a busy 2-core machine (1.85x), training images/s 491 to 780.
SPEED_NOISE = 2.0
# The metrics files in pipeline order: "Other metrics that changed" lists them by stage, then key.
STAGE_ORDER = ["metrics/train.json", "metrics/evaluate.json", "metrics/compress.json", "metrics/export.json"]


def is_timing(key: str) -> bool:
    """Whether a metric (`onnx.latency_ms`, `images_per_second`, ...) is a timing figure."""
    return key.rsplit(".", 1)[-1] in TIMING_KEYS


# params.yaml's top level
PARAM_SECTIONS = ["seed", "data", "model", "train", "log", "evaluate", "compress", "export", "monitor"]


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
    runs = exp_show_runs(dvc_json(dvc, ["exp", "show"], env))
    lines = [f"## reprotune review: workspace against `{base}`", ""]
    lines += _params_section(params, base)
    lines += _metrics_section(metrics, base)
    lines += _speed_section(metrics, base)
    lines += _plots_section(plots, plots_dir if rendered.returncode == 0 else None)
    workspace = next((run for run in runs if run.kind == "workspace"), None)
    groups = seed_groups(runs)
    if workspace is not None and any(group.params == workspace.group_params for group in groups):
        lines += ["### Seed spread", "", *seed_table(groups, runs, count_test_images(Path.cwd())), ""]
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
    """The headline metrics (always), then the other metrics that changed, by stage then key; timing
    figures are left to `_speed_section`."""
    lines = ["### Metrics", "", f"| metric | `{base}` | workspace | change |", "| --- | ---: | ---: | ---: |"]

    def row(key: str, change: dict) -> str:
        return f"| `{key}` | {_cell(change.get('old'))} | {_cell(change.get('new'))} | {_cell(change.get('diff'))} |"

    headline = set(HEADLINE)
    for path, key in HEADLINE:  # always shown, changed or not
        if not is_timing(key):
            lines.append(row(key, diff.get(path, {}).get(key, {})))
    rest = sorted(((path, key, change) for path, changes in diff.items() for key, change in changes.items()
                   if (path, key) not in headline and not is_timing(key) and change.get("old") != change.get("new")),
                  key=_stage_then_key)
    if rest:
        lines += ["", "<details><summary>Other metrics that changed (by stage, then key)</summary>", "",
                  f"| metric | `{base}` | workspace | change |", "| --- | ---: | ---: | ---: |"]
        lines += [row(f"{Path(path).stem}: {key}", change) for path, key, change in rest]
        lines += ["", "</details>"]
    return [*lines, ""]


def _stage_then_key(item: tuple[str, str, dict]) -> tuple[int, str, str]:
    path, key, _ = item
    return (STAGE_ORDER.index(path) if path in STAGE_ORDER else len(STAGE_ORDER), path, key)


def speed_ratio(change: dict) -> float | None:
    """new / old of a timing figure, when both are positive numbers."""
    old, new = change.get("old"), change.get("new")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (old, new))
    return new / old if numbers else None


def _speed_section(diff: dict, base: str) -> list[str]:
    """Timing figures apart from the metrics: the headline's always, the others when they moved by more
    than SPEED_NOISE either way; a smaller move is called noise, not a change."""
    lines = ["### Speed (machine-dependent)", "",
             f"Timings depend on the machine and its load when each revision ran; a move under {SPEED_NOISE:g}x "
             "either way is noise, not a change. Compare speed on one machine: `make bench`.", "",
             f"| figure | `{base}` | workspace | ratio |", "| --- | ---: | ---: | ---: |"]

    def row(name: str, change: dict) -> str:
        ratio = speed_ratio(change)
        moved = "-" if ratio is None else f"{ratio:.2f}x" + ("" if _beyond_noise(ratio) else " (noise)")
        return f"| `{name}` | {_cell(change.get('old'))} | {_cell(change.get('new'))} | {moved} |"

    headline = [(path, key) for path, key in HEADLINE if is_timing(key)]
    lines += [row(key, diff.get(path, {}).get(key, {})) for path, key in headline]
    timing = sorted(((path, key, change) for path, changes in diff.items() for key, change in changes.items()
                     if is_timing(key) and (path, key) not in headline), key=_stage_then_key)
    moved = [(path, key, change) for path, key, change in timing
             if (ratio := speed_ratio(change)) is not None and _beyond_noise(ratio)]
    lines += [row(f"{Path(path).stem}: {key}", change) for path, key, change in moved]
    quiet = len(timing) - len(moved)
    if quiet:
        lines += ["", f"{quiet} other timing figure{'s' if quiet > 1 else ''} moved less than {SPEED_NOISE:g}x "
                      "or not at all (`dvc metrics diff` lists them)."]
    return [*lines, ""]


def _beyond_noise(ratio: float) -> bool:
    return ratio > SPEED_NOISE or ratio < 1 / SPEED_NOISE


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


# Seed spread: `dvc exp show --json` rows grouped by every param but `seed`.

# The metrics summarised over seeds: (file, key, column). compress.json's `test_acc` is the
# compressed model's, a different number from evaluate.json's: it gets its own column.
SEED_METRICS = [
    ("metrics/train.json", "best_val_acc", "best_val_acc"),
    ("metrics/evaluate.json", "test_acc", "test_acc"),
    ("metrics/evaluate.json", "macro_f1", "macro_f1"),
    ("metrics/compress.json", "test_acc", "compressed test_acc"),
]
SEED_PARAM = "seed"  # params.yaml's top-level seed: all the randomness of a run (not the test set)
PRIORITY = {"experiment": 0, "commit": 1, "workspace": 2}  # which run of a repeated seed counts


@dataclass(frozen=True)
class Run:
    """One finished row of `dvc exp show --json`: the workspace, a commit or an experiment."""

    name: str
    kind: str  # "workspace", "commit" or "experiment"
    params: dict[str, object]  # flattened, "train.lr"; a params file other than params.yaml as "file:key"
    metrics: dict[str, float]  # by SEED_METRICS and TABLE_METRICS column, those the run has
    baseline: str | None = None  # an experiment's commit (its name); None for commits and the workspace

    @property
    def seed(self) -> object:
        return self.params.get(SEED_PARAM)

    @property
    def group_params(self) -> dict[str, object]:
        """What makes two runs the same recipe: every param but the seed."""
        return {key: value for key, value in self.params.items() if key != SEED_PARAM}

    @property
    def recipe(self) -> str:
        """`group_params` as a key."""
        return json.dumps(self.group_params, sort_keys=True)


@dataclass(frozen=True)
class Spread:
    """One metric over a group's seeds."""

    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator)
    min: float
    max: float


@dataclass(frozen=True)
class SeedGroup:
    """Runs whose params differ only in `seed`, one per seed, and their metrics' spread."""

    params: dict[str, object]  # every param but the seed
    seeds: list[object]
    names: list[str]  # the run counted for each seed
    spread: dict[str, Spread]  # by SEED_METRICS column; metrics fewer than 2 of the runs have are left out


def exp_show_runs(shown: list[dict]) -> list[Run]:
    """The finished runs in `dvc exp show --json`: the workspace, each commit and its experiments.
    Queued, running and failed experiments are left out (a running one still shows its baseline's
    metric files)."""
    runs = []
    for entry in shown:
        kind = "workspace" if entry.get("rev") == "workspace" else "commit"
        revs = [(entry, kind, None)]
        for exp in entry.get("experiments") or []:
            if _state(exp) == "success":
                # the newest rev (one since DVC 3)
                revs.append(((exp.get("revs") or [{}])[0], "experiment", entry.get("name") or entry.get("rev")))
        runs += [run for rev, kind, baseline in revs if (run := _run(rev, kind, baseline)) is not None]
    return runs


def _state(exp: dict) -> str:
    return (exp.get("executor") or {}).get("state") or "success"


def _run(rev: dict, kind: str, baseline: str | None = None) -> Run | None:
    """The run in one rev of `dvc exp show --json`, if it has params and no error."""
    data = rev.get("data") or {}
    if rev.get("error") or not data.get("params"):
        return None
    params = {}
    for path, content in data["params"].items():
        prefix = "" if path == "params.yaml" else f"{path}:"
        params.update({prefix + key: value for key, value in _flatten((content or {}).get("data") or {})})
    metrics = {}
    for path, key, column in [*SEED_METRICS, *TABLE_METRICS]:
        value = (((data.get("metrics") or {}).get(path) or {}).get("data") or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[column] = float(value)
    return Run(rev.get("name") or rev.get("rev") or kind, kind, params, metrics, baseline)


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def seed_groups(runs: Sequence[Run]) -> list[SeedGroup]:
    """Groups of 2+ seeds of the same params, best test accuracy first. A seed run twice with the
    same params (a queued experiment and the commit it reproduced, the workspace after `dvc exp
    run`) counts once: an experiment first, then a commit, then the workspace."""
    by_params: dict[str, dict[object, Run]] = {}
    for run in sorted(runs, key=lambda r: PRIORITY[r.kind]):  # stable: dvc's order within a kind
        if run.seed is None or not run.metrics:
            continue
        by_params.setdefault(run.recipe, {}).setdefault(json.dumps(run.seed), run)
    groups = []
    for members in by_params.values():
        if len(members) < 2:
            continue
        kept = sorted(members.values(), key=lambda run: (type(run.seed).__name__, run.seed))
        spread = {}
        for _, _, column in SEED_METRICS:
            values = [run.metrics[column] for run in kept if column in run.metrics]
            if len(values) >= 2:
                spread[column] = Spread(len(values), statistics.fmean(values), statistics.stdev(values),
                                        min(values), max(values))
        groups.append(SeedGroup(kept[0].group_params, [run.seed for run in kept], [run.name for run in kept],
                                spread))

    def rank(group: SeedGroup) -> list[float]:
        return [-group.spread[c].mean if c in group.spread else math.inf for c in ("test_acc", "best_val_acc")]

    return sorted(groups, key=rank)


def count_test_images(root: Path) -> int | None:
    """How many test images the workspace's preprocess stage kept (metrics/preprocess.json), if known."""
    path = root / "metrics" / "preprocess.json"
    try:
        count = json.loads(path.read_text()).get("test_images")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count > 0 else None


def seed_table(groups: Sequence[SeedGroup], runs: Sequence[Run], n_test: int | None) -> list[str]:
    """Markdown: one row per group (the params that differ between groups, the seeds, mean ± sample
    std of each metric), then how to read it."""
    singles = len({run.recipe for run in runs if run.seed is not None and run.metrics}) - len(groups)
    if not groups:
        return ["No two finished runs differ only in `seed` (sweep one: `dvc exp run --queue -S 'seed=0,1,2'`)."]
    keys = sorted({key for group in groups for key in group.params})
    differ = [key for key in keys if len({json.dumps(g.params.get(key)) for g in groups}) > 1]
    columns = [column for _, _, column in SEED_METRICS if any(column in g.spread for g in groups)]
    lines = ["| " + " | ".join([*(f"`{k}`" for k in differ), "n", "seeds", *columns]) + " |",
             "| " + " | ".join(["---"] * len(differ) + ["---:", "---"] + ["---:"] * len(columns)) + " |"]
    for group in groups:
        cells = [_cell(group.params.get(key)) for key in differ]
        cells += [str(len(group.seeds)), ", ".join(str(seed) for seed in group.seeds)]
        cells += [_spread_cell(group.spread.get(column), len(group.seeds)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds. A difference between two rows is a gain only if it "
              "is over about twice sqrt(std1²/n1 + std2²/n2); below that it is seed noise."]
    if n_test:
        lines.append(f"Test set: {n_test} images (metrics/preprocess.json), so one image is "
                     f"{1 / n_test:.4g} of test_acc ({100 / n_test:.3g} points).")
    if singles > 0:
        lines.append(f"Not shown: {singles} set{'s' if singles > 1 else ''} of params run with one seed only.")
    return lines


def _spread_cell(spread: Spread | None, seeds: int) -> str:
    if spread is None:
        return "-"
    cell = f"{spread.mean:.4f} ± {spread.std:.4f}"
    return cell if spread.n == seeds else f"{cell} (n={spread.n})"


# `reprotune experiments`: one row per finished run, the seed table's accuracy columns (the compressed
# model's test accuracy its own, named so), training speed, and the params each run changed against
# its baseline, wrapped so that nothing is cut and no line is wider than the terminal (120 columns
# when there is none). Built from `dvc exp show --json`, not `dvc exp show`'s own table: DVC renames
# a metric `file:key` once two files share the key, and prints every column however wide.
TABLE_METRICS = [("metrics/train.json", "images_per_second", "img/s")]
BASELINE_MARK = "(baseline)"


def experiments_table(shown: list[dict], width: int = 120) -> list[str]:
    """The `reprotune experiments` table for `dvc exp show --json` output, as lines of at most
    `width` characters (`width` at least 80)."""
    runs = exp_show_runs(shown)
    if not runs:
        return ["No finished runs yet: `dvc repro` or `dvc exp run` first."]
    head = next((run for run in runs if run.kind == "commit"), runs[0])
    by_name = {run.name: run for run in runs if run.kind == "commit"}
    columns = [column for _, _, column in [*SEED_METRICS, *TABLE_METRICS]
               if column != "compressed test_acc" or any(column in run.metrics for run in runs)]
    names = [("└ " if run.kind == "experiment" else "") + run.name for run in runs]
    name_width = max(len("Experiment"), *(len(name) for name in names))
    cells = [[_metric(column, run.metrics.get(column)) for column in columns] for run in runs]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    fixed = name_width + sum(2 + w for w in widths) + 2
    room = max(width - fixed, 24)
    header = "  ".join(["Experiment".ljust(name_width), *(c.rjust(w) for c, w in zip(columns, widths, strict=True)),
                        f"params changed (against {head.name})"[:room]])
    lines = [header.rstrip(), "─" * min(width, max(len(header), fixed + 24))]
    for run, name, row in zip(runs, names, cells, strict=True):
        base = by_name.get(run.baseline, head) if run.kind == "experiment" else head
        changes = BASELINE_MARK if run is head else _changes(run.params, base.params)
        wrapped = _wrap(changes, room) or [""]
        first = "  ".join([name.ljust(name_width), *(c.rjust(w) for c, w in zip(row, widths, strict=True)),
                           wrapped[0]])
        lines.append(first.rstrip())
        lines += [" " * fixed + more for more in wrapped[1:]]
    left = _unfinished(shown)
    if left:
        lines += ["", f"Not shown: {left} (`dvc exp show` lists them)."]
    return lines


def _metric(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if column == "img/s" else f"{value:.4f}"


def _changes(params: dict[str, object], base: dict[str, object]) -> str:
    """`key=value` for each param that differs from the baseline's (`key=-` for one it lacks)."""
    keys = sorted(set(params) | set(base), key=lambda k: (PARAM_SECTIONS.index(k.split(".")[0])
                                                          if k.split(".")[0] in PARAM_SECTIONS else 99, k))
    return " ".join(f"{key}={_cell(params.get(key)) if key in params else '-'}".replace(" ", "")
                    for key in keys if json.dumps(params.get(key)) != json.dumps(base.get(key)))


def _wrap(text: str, width: int) -> list[str]:
    """Words onto lines of at most `width` characters; a single longer word is split, not cut."""
    lines: list[str] = []
    for word in text.split():
        while len(word) > width:
            lines.append(word[:width])
            word = word[width:]
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _unfinished(shown: list[dict]) -> str:
    """The experiments left out of the table: how many are queued, running or failed."""
    counts: dict[str, int] = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            if (state := _state(exp)) != "success":
                counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
