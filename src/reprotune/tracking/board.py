"""`reprotune tensorboard`: every experiment's TensorBoard runs side by side, plus the workspace's.

Each DVC experiment keeps its `runs/` in DVC's cache, and the workspace holds one experiment's at
a time, so `tensorboard --logdir runs` can never compare two. Here each experiment that
`dvc exp show` lists (queued ones once they ran) is read from the cache by name through
`dvc.api.DVCFileSystem` into a temporary folder, never touching the workspace, and TensorBoard
gets them all as runs named `<experiment>/<stage>`, the workspace's as `workspace/<stage>`: the
scalars overlay and the HPARAMS tab lists one trial per experiment.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from reprotune.errors import ReprotuneError

RUNS = "runs"


def experiments(root: Path) -> list[tuple[str, str]]:
    """(name, commit) of every experiment in the repository, in DVC's order, names unique."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        listed = repo.experiments.ls(all_commits=True)
    found: dict[str, str] = {}
    for entries in listed.values():
        for name, rev in entries:
            if rev and name not in found:
                found[name] = rev
    return sorted(found.items())


def gather(root: Path, dest: Path) -> dict[str, Path]:
    """Write each experiment's `runs/` from the DVC cache into `dest/<name>`; return name -> folder,
    the workspace's own `runs/` included as `workspace` (read in place). A stage's runs that are not
    in the local cache (not run, or pulled without their data) are left out, with a line on stderr;
    an experiment with none at all too."""
    from dvc.api import DVCFileSystem

    runs = {"workspace": root / RUNS} if (root / RUNS).is_dir() else {}
    for name, rev in experiments(root):
        target = dest / name
        got, missing, why = [], [], ""
        try:
            fs = DVCFileSystem(str(root), rev=rev)
            stages = sorted(fs.ls(RUNS, detail=False))
        except Exception as exc:  # noqa: BLE001 - DVC raises many types for missing cache entries
            stages, why = [], _brief(exc)
        # Stage by stage: an experiment run up to `evaluate` has no compress or export runs, and its
        # finetune and evaluate curves still belong on the board.
        for stage in stages:
            folder = target / Path(stage).name
            try:
                fs.get(stage, str(folder), recursive=True)
                got.append(folder.name)
            except Exception as exc:  # noqa: BLE001
                shutil.rmtree(folder, ignore_errors=True)
                missing.append(folder.name)
                why = why or _brief(exc)
        if not got:
            print(f"reprotune: {name}: runs not available ({why or 'none'})", file=sys.stderr)
            shutil.rmtree(target, ignore_errors=True)
            continue
        if missing:
            print(f"reprotune: {name}: no runs of {', '.join(missing)} (not run, or not in the local cache)",
                  file=sys.stderr)
        runs[name] = target
    return runs


@contextlib.contextmanager
def gathered(root: Path) -> Iterator[dict[str, Path]]:
    """`gather` into a temporary folder that is removed afterwards."""
    dest = Path(tempfile.mkdtemp(prefix="reprotune-runs-"))
    try:
        yield gather(root, dest)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def serve(root: Path, host: str, port: int, tensorboard: str) -> int:
    """Run TensorBoard over every experiment's runs until Ctrl-C or SIGTERM; its exit status."""
    with gathered(root) as runs:
        if not runs:
            raise ReprotuneError(f"{root}: no runs/ and no experiments yet (run `make demo` or `dvc repro`)")
        spec = ",".join(f"{name}:{path}" for name, path in runs.items())
        print(f"TensorBoard at http://{host}:{port}/ over {', '.join(runs)}", flush=True)
        # TensorBoard prints a notice on stderr whenever TensorFlow is not installed, with no option to
        # leave it out; it is expected here (tensorboardX writes the logs; nothing needs TensorFlow).
        print("(TensorBoard's 'TensorFlow installation not found' notice is expected: no TensorFlow is needed)",
              flush=True)
        # --load_fast false: the pure-Python loader, which needs no separate data server binary.
        server = subprocess.Popen([tensorboard, "--logdir_spec", spec, "--host", host, "--port", str(port),
                                   "--load_fast", "false"])
        previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        try:
            return server.wait()
        except KeyboardInterrupt:
            server.terminate()
            return server.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _brief(exc: Exception) -> str:
    """DVC's message for a missing cache entry, on one line and cut to a readable length."""
    return " ".join(str(exc).split())[:200]
