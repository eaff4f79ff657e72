"""dvc.yaml's code deps are exactly what each stage runs, so `dvc status` never calls stale output fresh.

A stage's code is its script plus the import closure of that script inside `src/reprotune`
(`__init__.py` included, imports inside functions included). The first test computes the closure
from the source and compares it with dvc.yaml; the second edits each module in a pipeline that
`dvc repro` built and checks that `dvc status` names exactly the stages that run it; the third
checks, from the stage processes of that `dvc repro`, that the closure is what they really loaded.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import yaml

from fixtures import IDLE, REPO, run, set_params

PACKAGE = "reprotune"


def module_path(name: str, root: Path = REPO) -> Path | None:
    """`reprotune.data.cifar` -> src/reprotune/data/cifar.py (relative to `root`); None outside the package."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root / "src" / Path(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(root)
    return None


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Names of the package's modules that `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((root / path).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from reprotune import data` imports the submodule reprotune.data
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if module_path(f"{node.module}.{alias.name}", root))
    modules = set()
    for name in found:
        parts = name.split(".")
        # importing reprotune.x runs reprotune/__init__.py first
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                       if module_path(".".join(parts[:i]), root))
    return modules


def closure(script: Path, root: Path = REPO) -> list[str]:
    """The script and every package module it loads, transitively, as sorted repo-relative paths."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_path(name, root) for name in imported_modules(path, root))
    return sorted(str(p) for p in seen)


def code_deps(root: Path = REPO) -> dict[str, list[str]]:
    """Each stage's deps in dvc.yaml that are code (the stage script and src/)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: sorted(d for d in stage["deps"] if d.startswith(("stages/", "src/")))
            for name, stage in stages.items()}


TABLE = REPO / "docs/reference/code-deps.md"
TABLE_HEAD = """# Which stages an edit reruns

Generated from `dvc.yaml` by `python tests/test_lineage.py` (and kept true by its test): each stage's
code deps are its script and the import closure of that script in `src/reprotune`, so editing a
module makes exactly the stages marked here stale (`dvc status`), and `dvc repro` reruns them and
what follows from their outputs.
"""


def rerun_table(root: Path = REPO) -> str:
    """The Markdown table module -> stages whose code deps include it."""
    deps = code_deps(root)
    stages = list(deps)
    modules = sorted({d for paths in deps.values() for d in paths} |
                     {str(p.relative_to(root)) for p in (root / "src/reprotune").rglob("*.py")},
                     key=lambda path: (not path.startswith("stages/"), path))
    rows = ["| module | " + " | ".join(stages) + " |", "| --- |" + " :-: |" * len(stages)]
    for module in modules:
        name = module.removeprefix("src/reprotune/")
        rows.append(f"| `{name}` | " + " | ".join("✓" if module in deps[s] else "" for s in stages) + " |")
    return TABLE_HEAD + "\n" + "\n".join(rows) + "\n"


def test_the_rerun_table_in_the_docs_is_generated_from_dvc_yaml():
    assert TABLE.read_text() == rerun_table(), "run `python tests/test_lineage.py`"


def test_an_edit_reruns_only_the_stages_that_run_it():
    # What issue 24 asked of the split, on dvc.yaml's declared deps (the real `dvc status` below
    # checks that they are what each stage loads).
    reruns = {str(module): {s for s, paths in code_deps().items() if f"src/reprotune/{module}" in paths}
              for module in ("training/augment.py", "evaluation/report.py", "export/phone.py",
                             "data/folders.py", "evaluation/drift.py", "inference/server.py")}
    assert not reruns["training/augment.py"] & {"download", "preprocess"}
    assert "finetune" not in reruns["evaluation/report.py"]
    assert "compress" not in reruns["export/phone.py"]
    assert "evaluate" not in reruns["data/folders.py"] | reruns["evaluation/drift.py"]
    assert reruns["inference/server.py"] == set()


def test_every_stage_depends_on_exactly_its_import_closure():
    expected = {name: closure(Path(f"stages/{name}.py")) for name in code_deps()}
    assert code_deps() == expected, "dvc.yaml code deps should be:\n" + yaml.safe_dump(expected)


def test_the_stage_processes_loaded_exactly_their_closure(pipeline):
    loaded: dict[str, set[str]] = {}
    for record in (pipeline.parent / "imports").glob("*.json"):
        process = json.loads(record.read_text())
        script = Path(process["argv"][0])
        if script.parent.name == "stages":
            paths = {str(module_path(name)) for name in process["modules"]}
            loaded.setdefault(script.stem, set()).update(paths | {f"stages/{script.name}"})
    assert set(loaded) == set(code_deps())  # every stage ran and was recorded
    deps = code_deps()
    # compress (ratio 0) and monitor (no incoming images) stop early, before their lazy imports: they
    # load part of what they declare. Every other stage loads exactly what it declares.
    for name, paths in loaded.items():
        if name in IDLE:
            assert paths < set(deps[name]), name
        else:
            assert sorted(paths) == deps[name], name


def _status(root: Path) -> dict[str, set[str]]:
    """`dvc status`: for each stage that changed, the deps (and params) that changed."""
    changed: dict[str, set[str]] = {}
    for stage, entries in json.loads(run(["dvc", "status", "--json"], root).stdout).items():
        for entry in entries:
            for path, what in entry.get("changed deps", {}).items():
                keys = what if isinstance(what, dict) else {path: what}  # params: {key: "modified"}
                changed.setdefault(stage, set()).update(keys)
    return changed


def _edited(root: Path, paths: list[str]):
    """Append a comment to each file; return a function that restores them byte for byte."""
    original = {path: (root / path).read_bytes() for path in paths}
    for path in paths:
        with (root / path).open("a") as f:
            f.write("\n# an edit that changes nothing but the file's hash\n")

    def restore():
        for path, content in original.items():
            (root / path).write_bytes(content)
    return restore


def test_dvc_status_names_exactly_the_stages_that_run_an_edited_module(pipeline):
    restore = _edited(pipeline, ["src/reprotune/inference/predict.py", "src/reprotune/cli.py"])
    try:  # code no stage runs: nothing to rerun
        assert _status(pipeline) == {}
    finally:
        restore()
    modules = sorted(str(p.relative_to(pipeline)) for p in (pipeline / "src/reprotune").rglob("*.py"))
    restore = _edited(pipeline, modules)
    try:  # every module at once: each stage names exactly its own modules among the changed deps
        assert _status(pipeline) == {name: {d for d in deps if d.startswith("src/")}
                                     for name, deps in code_deps(pipeline).items()}
    finally:
        restore()
    assert _status(pipeline) == {}


def test_a_training_seed_sweep_does_not_download_again(pipeline):
    params = pipeline / "params.yaml"
    original = params.read_bytes()
    set_params(params, {"seed": 1})
    try:
        changed = _status(pipeline)
    finally:
        params.write_bytes(original)
    # the split and the training (and compress's recovery training) use `seed`; the archive does not
    # (data.synthetic_seed seeds it)
    assert changed == {"preprocess": {"seed"}, "finetune": {"seed"}, "compress": {"seed"}}


if __name__ == "__main__":  # regenerate docs/reference/code-deps.md after changing what a stage imports
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(rerun_table())
    print(f"wrote {TABLE.relative_to(REPO)}")
