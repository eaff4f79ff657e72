"""Put the workspace back when a stage run by DVC rejects its params: a mistake loses nothing.

DVC deletes a stage's outputs before it runs the stage's command, and `dvc exp run -S key=value`
writes the value into the params file before that; DVC undoes neither when the command fails. Every
stage validates the whole params file before it writes anything, so the first stage DVC runs is the
one that rejects a bad value, and at that moment the workspace differs from before the command in
two ways only, both undone here:

- this stage's outputs are gone: they come back from the DVC cache, as dvc.lock records them. The
  outputs kept in git (`cache: false`: metrics, small CSVs) are not in it (DVC's run cache, which
  would hold them, is off for a stage with such an output), and after `dvc repro` they are often
  not committed yet: so each stage DVC runs keeps a copy of those it wrote (`keep_uncached`, a few
  KB under .dvc/tmp), and git's HEAD copy serves where that is missing, if its hash is dvc.lock's;
- under `dvc exp run -S`, the params files named by `-S` hold the new values: each gets back the
  text it had, from git HEAD or, when the user had edited it (as `make demo` leaves it), from the
  stash DVC made of the workspace as the command started, whichever gives what DVC wrote when the
  same `-S` is applied to it; failing both, the `-S` keys alone go back to their HEAD values.

Only on this error path is DVC imported, and only its read-only parts: the `dvc` process running
the stage holds the repository lock, so nothing here may take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from reprotune.files import atomic_dir, atomic_file


def undo_rejected_run(stage: str, root: Path) -> str:
    """Restore what DVC changed before `stage` rejected its params; say what was done, briefly."""
    done, left = [], []
    restored, lost = _restore_outputs(stage, root)
    if restored:
        done.append(f"{stage}'s outputs restored from the DVC cache")
    if lost:
        left.append(f"no copy in the DVC cache or git to restore {', '.join(lost)} from")
    reverted, kept = _revert_set_params(root)
    if reverted:
        done.append(f"{', '.join(reverted)} as before `dvc exp run -S`")
    if kept:
        left.append(f"{', '.join(kept)} still holding the `-S` values")
    if left:
        return f"the workspace is not all as it was: {'; '.join(done + left)}"
    return f"the workspace is as it was{': ' if done else ''}{'; '.join(done)}"


# ------------------------------------------------------------------------------------- outputs

def _restore_outputs(stage: str, root: Path) -> tuple[list[str], list[str]]:
    """Bring back the stage's outputs that DVC removed, from the cache dvc.lock points into."""
    from dvc.repo import Repo  # noqa: PLC0415 - DVC only on this error path (about a second to import)

    with Repo(os.fspath(root)) as repo:
        outs = repo.stage.load_one(path=os.fspath(root / "dvc.yaml"), name=stage).outs
        restored, lost = [], []
        for out in outs:
            path = root / out.def_path
            if path.exists() or not out.hash_info or not out.hash_info.value:
                continue  # still there (a persistent output), or never built: nothing to bring back
            try:
                _checkout(out, path, root)
                restored.append(out.def_path)
            except FileNotFoundError:
                lost.append(out.def_path)
    return restored, lost


def _checkout(out: Any, path: Path, root: Path) -> None:
    """Write one output as dvc.lock records it; FileNotFoundError when no copy of it is found.

    Built beside its place and moved in (files.atomic_file, atomic_dir), so an interrupted restore
    leaves no half-written output.
    """
    oid = out.hash_info.value
    cache = out.cache
    path.parent.mkdir(parents=True, exist_ok=True)
    if out.hash_info.isdir:
        entries = json.loads(Path(cache.oid_to_path(oid)).read_text())
        sources = {entry["relpath"]: Path(cache.oid_to_path(entry["md5"])) for entry in entries}
        if missing := [relpath for relpath, source in sources.items() if not source.is_file()]:
            raise FileNotFoundError(missing[0])
        with atomic_dir(path) as staging:
            for relpath, source in sources.items():
                (staging / relpath).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / relpath)
        return
    source = Path(cache.oid_to_path(oid))
    data = source.read_bytes() if source.exists() else _uncached_copy(out.def_path, oid, root)
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def _uncached_copy(relpath: str, md5: str, root: Path) -> bytes:
    """The content dvc.lock records for a `cache: false` output: the copy `keep_uncached` kept, or git's
    HEAD copy if it is that content."""
    kept = root / KEPT / md5
    if kept.is_file():
        return kept.read_bytes()
    data = _git_show(f"HEAD:{relpath}", root)
    if data is None or _md5(data) != md5:
        raise FileNotFoundError(relpath)
    return data


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# Where each stage keeps a copy of the `cache: false` outputs it wrote, by md5 (DVC's own hash of a file).
KEPT = Path(".dvc/tmp/reprotune-uncached")


def keep_uncached(stage: str, root: Path) -> None:
    """After `stage` succeeded under DVC: keep a copy of its `cache: false` outputs, so that a later
    rejected run can restore them whether or not they were committed. Copies that neither dvc.lock
    nor this run names go, so the folder holds about one copy per output. Best effort: a failure
    here must not fail a stage whose outputs are written."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
        folder = root / KEPT
        folder.mkdir(parents=True, exist_ok=True)
        kept = set()
        for kind in ("outs", "metrics", "plots"):
            for out in (stages.get(stage) or {}).get(kind) or []:
                if not isinstance(out, dict):
                    continue
                (path, options), = out.items()
                if (options or {}).get("cache", True) or not (root / path).is_file():
                    continue
                data = (root / path).read_bytes()
                kept.add(digest := _md5(data))
                with atomic_file(folder / digest) as tmp:
                    Path(tmp).write_bytes(data)
        lock = (root / "dvc.lock").read_text() if (root / "dvc.lock").exists() else ""
        for copy in folder.iterdir():  # dvc.lock names this run's outputs only once the stage is done
            if copy.name not in kept and copy.name not in lock:
                copy.unlink(missing_ok=True)
    except (OSError, yaml.YAMLError, ValueError, AttributeError):
        pass


def _git_show(spec: str, root: Path, *options: str) -> bytes | None:
    proc = subprocess.run(["git", "show", *options, spec], cwd=root, capture_output=True, check=False)  # noqa: S607
    return proc.stdout if proc.returncode == 0 else None


# ------------------------------------------------------------------------------------- params

def _revert_set_params(root: Path) -> tuple[list[str], list[str]]:
    """Under `dvc exp run -S` in this workspace, put each params file it changed back as it was."""
    reverted, kept = [], []
    overrides_by_file, since = _set_params(root)
    for name, overrides in overrides_by_file.items():
        path = root / name
        before = _text_before(path, name, overrides, root, since)
        if before is not None:
            with atomic_file(path) as tmp:
                Path(tmp).write_bytes(before)
            reverted.append(name)
        elif _revert_keys(path, name, overrides, root):
            reverted.append(name)
        else:
            kept.append(f"{name} ({' '.join(overrides)})")
    return reverted, kept


def _set_params(root: Path) -> tuple[dict[str, list[str]], float]:
    """The `-S` overrides of the `dvc exp run` that runs this stage in `root`, by params file, and when
    that command started.

    DVC passes them to no stage, so they are read from the command line of the `dvc` process above
    this one, with DVC's own parser. Empty for `dvc repro`, and for experiments DVC runs in a
    temporary copy (`--temp`, the queue): those leave the workspace alone.
    """
    import psutil  # noqa: PLC0415 - a DVC dependency, needed only here
    from dvc.cli import parse_args  # noqa: PLC0415
    from dvc.utils.cli_parse import to_path_overrides  # noqa: PLC0415

    for process in psutil.Process().parents():
        try:
            argv, cwd = process.cmdline(), Path(process.cwd())
        except psutil.Error:
            continue
        starts = [i for i, arg in enumerate(argv) if Path(arg).name == "dvc"]  # also `python -m dvc`
        if not starts:
            continue
        args = argv[starts[0] + 1:]
        if args[:2] not in (["exp", "run"], ["experiments", "run"]):
            return {}, 0.0  # the nearest dvc is `dvc repro` (or another command): -S is not in play
        try:
            parsed = parse_args(args)
        except SystemExit:  # not a command line DVC's parser takes: leave the params alone
            return {}, 0.0
        if parsed.queue or parsed.tmp_dir or not _same_place(cwd, root):
            return {}, 0.0
        return to_path_overrides(parsed.set_param or []), process.create_time()
    return {}, 0.0


def _same_place(cwd: Path, root: Path) -> bool:
    cwd, root = cwd.resolve(), root.resolve()
    return cwd == root or root in cwd.parents


def _text_before(path: Path, name: str, overrides: list[str], root: Path, since: float = 0.0) -> bytes | None:
    """The file's text before `-S`, or None if it cannot be told. The candidates: its HEAD version, and
    the one in the stash DVC made of the workspace's own changes when the command started (popped
    again at once, but the commit stays among git's loose objects); a candidate is the text only if
    applying `-S` to it gives what DVC wrote. Not the index: DVC stages its own changes there while
    the experiment runs."""
    from dvc.utils.hydra import apply_overrides  # noqa: PLC0415

    now = _load(path.read_bytes())
    for text in (_git_show(f"HEAD:{name}", root), *_stashed(name, root, since)):
        if text is None:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            trial = Path(scratch) / path.name
            trial.write_bytes(text)
            try:
                apply_overrides(trial, overrides)
            except Exception:  # noqa: BLE001, S112 - DVC applied these once; a text it cannot take is not the one
                continue
            if _load(trial.read_bytes()) == now:
                return text
    return None


def _stashed(name: str, root: Path, since: float) -> list[bytes]:
    """`name` in the workspace stashes ("WIP on ...", on HEAD) written since `since`, newest first."""
    if not since:
        return []
    proc = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=root, capture_output=True, text=True,
                          check=False)  # noqa: S607
    if proc.returncode != 0:
        return []
    objects = (root / proc.stdout.strip() / "objects").resolve()
    recent = sorted(((f.stat().st_mtime, f.parent.name + f.name) for f in objects.glob("??/*")
                     if f.stat().st_mtime >= since - 1), reverse=True)
    head = (_git_show("HEAD", root, "--format=%H", "--no-patch") or b"").strip().decode()
    texts = []
    for _, sha in recent:
        info = _git_show(sha, root, "--format=%P%n%s", "--no-patch")
        if info is None:
            continue  # not a commit
        parents, _, subject = info.decode(errors="replace").partition("\n")
        if parents.split()[:1] == [head] and subject.startswith("WIP on "):
            text = _git_show(f"{sha}:{name}", root)
            if text is not None:
                texts.append(text)
    return texts


def _revert_keys(path: Path, name: str, overrides: list[str], root: Path) -> bool:
    """Set only the `-S` keys back to their HEAD values (dropping keys `-S` added): the user edited
    the file too, and those edits stay. False when HEAD has no such file to take values from."""
    from dvc.utils.hydra import to_hydra_overrides  # noqa: PLC0415
    from dvc.utils.serialize import modify_yaml  # noqa: PLC0415

    head = _git_show(f"HEAD:{name}", root)
    if head is None:
        return False
    original = _load(head)
    keys = [override.key_or_group.split(".") for override in to_hydra_overrides(overrides)]
    with modify_yaml(path) as data:
        for key in keys:
            node, source = data, original
            for depth, part in enumerate(key):
                if not isinstance(node, dict):
                    break
                if part not in node:  # `-S ~key` deleted it: back from HEAD, if HEAD has it
                    if isinstance(source, dict) and part in source:
                        node[part] = source[part]
                    break
                if not isinstance(source, dict) or part not in source:
                    node.pop(part)  # `-S +key=...` added it (or its section): gone again
                    break
                if depth == len(key) - 1:
                    node[part] = source[part]
                node, source = node[part], source[part]
    return True


def _load(text: bytes) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None
