"""Kill rate per module from the last mutmut run: python bench/mutants.py [--survivors]

`make mutants` runs mutmut (pyproject.toml's [tool.mutmut] lists the modules and the tests that own
them), then this. A mutant is killed when a test fails with it (or it times out); it survives when
every test that reaches its function passes; "no tests" means no selected test reaches the function
at all (it is covered by the slower end-to-end tests instead). Kill rate = killed / (killed +
survived); killed of all = killed / mutants, no tests counting as not killed. "not run": a run
stopped before reaching them (`mutmut run` without `rm -rf mutants` resumes where it stopped).
Writes bench/results/mutants.md; `--survivors` also prints each survivor's diff.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

MUTANTS = Path("mutants")
RESULTS = Path(__file__).parent / "results"
KILLED = {1, 3, 36, -24, 24, 152, 255}  # a failing test (1, 3) or a timeout (the rest), as mutmut counts them
SURVIVED = {0}
NO_TESTS = {5, 33}
# The part of the loop measured on its own: the step and the epoch.
SUBSETS = {"training/loop": ("step and epoch", ("clip_gradients", "EpochProgress", "train_one_epoch",
                                                "pause_on_ctrl_c"))}


def outcomes() -> dict[str, dict[str, int | None]]:
    """module -> {mutant name: exit code} from mutmut's .meta files."""
    found = {}
    for meta in sorted(MUTANTS.glob("src/reprotune/**/*.py.meta")):
        module = str(meta.relative_to(MUTANTS / "src/reprotune")).removesuffix(".py.meta")
        found[module] = json.loads(meta.read_text()).get("exit_code_by_key", {})
    return found


def tally(codes) -> Counter:
    counts = Counter()
    for code in codes:
        counts["killed" if code in KILLED else "survived" if code in SURVIVED else
               "no tests" if code in NO_TESTS else "not run" if code is None else "other"] += 1
    return counts


def rate(counts: Counter) -> str:
    tested = counts["killed"] + counts["survived"]
    return f"{counts['killed'] / tested:.0%}" if tested else "-"


def function_of(mutant: str) -> str:
    """reprotune.training.loop.x_train_one_epoch__mutmut_3 -> train_one_epoch;
    xǁEpochProgressǁsummary -> EpochProgress."""
    name = mutant.split(".")[-1]
    name = re.sub(r"__mutmut_\d+$", "", name)
    return name.removeprefix("x_").strip("xǁ").split("ǁ")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="print each surviving mutant's diff")
    args = parser.parse_args()
    found = outcomes()
    if not found:
        sys.exit("bench/mutants.py: no mutants/ results here (run `make mutants` first)")
    rows = []
    survivors = []
    for module, codes in found.items():
        rows.append((f"{module}.py", tally(codes.values())))
        if module in SUBSETS:
            label, functions = SUBSETS[module]
            rows.append((f"{module}.py: {label}", tally(c for m, c in codes.items() if function_of(m) in functions)))
        survivors += [m for m, c in codes.items() if c in SURVIVED]
    lines = ["# Mutation testing", "", "Command: `make mutants` (mutmut; see bench/mutants.py)", "",
             "| module | mutants | killed | survived | no tests | not run | kill rate | killed of all |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['not run']} | "
              f"{rate(c)} | {c['killed'] / max(1, sum(c.values())):.0%} |" for name, c in rows]
    by_function = defaultdict(list)
    for mutant in survivors:
        by_function[function_of(mutant)].append(mutant)
    lines += ["", "Survivors by function: " + (", ".join(f"{f} ({len(m)})" for f, m in sorted(by_function.items()))
                                                or "none")]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mutants.md").write_text(text)
    print(text)
    if args.survivors:
        for mutant in survivors:
            print(subprocess.run([str(Path(sys.executable).parent / "mutmut"), "show", mutant], capture_output=True,
                                 text=True).stdout)


if __name__ == "__main__":
    main()
