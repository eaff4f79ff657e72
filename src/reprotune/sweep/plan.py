"""Which experiments a sweep holds, what each changes against the base commit, what it is called,
and which of them already exist (here or on the git remote) with the same params and code.

An experiment is the base commit plus a few changed input files (params.yaml, for a `-S` grid; any
file, for an experiment taken from DVC's queue). Two experiments are the same when they start from
the same commit and change the same inputs the same way: DVC records each as a commit whose parent
is the base, so comparing trees is enough, with no bookkeeping of our own to fall out of date.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reprotune.errors import ReprotuneError, first_line

LOCK = "dvc.lock"
# The experiment commit's message records the stages a sweep ran (`dvc exp run` targets), so that a
# sweep up to `evaluate` does not count as the whole pipeline's experiment.
MESSAGE_TARGETS = "reprotune sweep targets: "
# Remote experiments are fetched here to be compared, then these refs are deleted again.
SCRATCH_REFS = "refs/reprotune-sweep"


@dataclass(frozen=True)
class Experiment:
    """One experiment: its name, the `-S` overrides that make it (empty for one from the queue), the
    input files it changes against the base commit (path -> text; None: deleted) and the `dvc exp
    run` targets (empty: the whole pipeline)."""
    name: str
    overrides: tuple[str, ...] = ()
    files: dict[str, str | None] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    queued: str | None = None  # the DVC queue entry it came from (its stash commit)

    @property
    def message(self) -> str:
        """The experiment commit's message: what the sweep ran."""
        return f"reprotune sweep: {self.name}\n\n{MESSAGE_TARGETS}{' '.join(self.targets) or 'all'}"


def git(args: list[str], cwd: Path | str, check: bool = True) -> str:
    """Run git; its stdout. A failure raises ReprotuneError with git's own first line."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ReprotuneError(f"git {' '.join(args[:2])}: {complaint(proc).removeprefix('fatal: ')}")
    return proc.stdout


def complaint(proc: subprocess.CompletedProcess) -> str:
    """A failed command's first non-blank line on stderr (its exit status if it printed none)."""
    return next((line for line in proc.stderr.splitlines() if line.strip()), f"exit {proc.returncode}")


def blob(root: Path, rev: str, path: str) -> bytes | None:
    """A file's bytes at a revision, None if it has no such file."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def show(root: Path, rev: str, path: str) -> str | None:
    """A file's text at a revision, None if it has no such file."""
    data = blob(root, rev, path)
    return None if data is None else data.decode(errors="surrogateescape")


def free_name(name: str, taken) -> str:
    """`name`, or `name-2`, `name-3`, ...: the first that `taken` does not hold."""
    return next(n for n in (name, *(f"{name}-{i}" for i in range(2, 10_000))) if n not in taken)


def exp_prefix(base: str) -> str:
    """Where DVC keeps the experiments of a base commit: refs/exps/ab/cdef.../NAME."""
    return f"refs/exps/{base[:2]}/{base[2:]}/"


# ------------------------------------------------------------------------------------------- the grid

def grid(root: Path, base: str, sets: list[str], targets: tuple[str, ...]) -> list[Experiment]:
    """The experiments of a `-S` grid, as `dvc exp run --queue -S` expands it (DVC's own Hydra sweep
    parser: `train.lr=0.01,0.03`, `range(0,3)`, `choice(...)`, a `file.yaml:` prefix), each file's
    text as `dvc exp run -S` will write it (DVC's own writer, on the base commit's text), checked
    against reprotune's params before anything runs."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

    try:
        points = get_hydra_sweeps(to_path_overrides(sets))
    except InvalidArgumentError as exc:
        raise ReprotuneError(f"-S: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Hydra's parser raises its own types for a bad override
        raise ReprotuneError(f"-S: not a valid override ({first_line(exc)})") from None
    experiments = []
    base_text = functools.cache(lambda path: show(root, base, path))  # each file once, not once a point
    with tempfile.TemporaryDirectory(prefix="reprotune-sweep-") as scratch:
        for point in points:
            files, overrides = {}, []
            for path, changes in point.items():
                text = base_text(path)
                if text is None:
                    raise ReprotuneError(f"-S {path}:{changes[0]}: the base commit has no {path}")
                trial = Path(scratch) / f"trial{Path(path).suffix}"
                trial.write_text(text)
                try:
                    apply_overrides(trial, changes)
                except InvalidArgumentError as exc:
                    cause = first_line(exc.__cause__) if exc.__cause__ else str(exc)
                    raise ReprotuneError(f"-S {' '.join(changes)}: {cause}") from None
                files[path] = trial.read_text()
                overrides += [o if path == "params.yaml" else f"{path}:{o}" for o in changes]
                if Path(path).name == "params.yaml":
                    _check_params(trial, path, changes)
            experiments.append(Experiment("", tuple(overrides), files, targets))
    return _named(experiments)


def _check_params(trial: Path, path: str, changes: list[str]) -> None:
    """A value reprotune would reject (train.lr=abc) stops the sweep before any machine is used."""
    from reprotune.config import load_params

    try:
        load_params(trial)
    except ReprotuneError as exc:
        raise ReprotuneError(f"-S {' '.join(changes)}: {str(exc).replace(str(trial), path)}") from None


def _named(experiments: list[Experiment]) -> list[Experiment]:
    """Names from the values that vary across the grid, e.g. lr0.01-seed1 (all the overrides when
    only one experiment), each key by its last part unless two varying keys share it."""
    def pairs(e: Experiment) -> dict[str, str]:
        return dict(o.rsplit(":", 1)[-1].split("=", 1) for o in e.overrides)

    values = [pairs(e) for e in experiments]
    keys = list(dict.fromkeys(k for v in values for k in v))
    varying = [k for k in keys if len({v.get(k) for v in values}) > 1] or keys
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    named, seen = [], set()
    for experiment, value in zip(experiments, values, strict=True):
        name = "-".join(f"{k.replace('.', '_') if short[k] in clash else short[k]}{value.get(k, '')}"
                        for k in varying) or "base"
        name = free_name(ref_safe(name), seen)
        seen.add(name)
        named.append(dataclasses.replace(experiment, name=name))
    return named


def ref_safe(name: str) -> str:
    """A name git accepts as one ref component (DVC's experiment names are refs)."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    name = re.sub(r"\.{2,}", ".", name).strip(".")
    return name.removesuffix(".lock") or "exp"


# ------------------------------------------------------------------------------------------- the queue

def queued(root: Path, base: str) -> tuple[list[Experiment], list[str]]:
    """The experiments waiting in DVC's queue on the base commit, each as the inputs it changes (the
    queue keeps a whole workspace: results and DVC's own files are left out, so the experiment runs
    from the base commit's results as a `-S` experiment does), and the names of those queued on
    another commit (left in the queue)."""
    from dvc.repo import Repo
    from dvc.repo.experiments.executor.base import BaseExecutor

    with Repo(str(root)) as repo:
        entries = list(repo.experiments.celery_queue.iter_queued())
    outputs = output_paths(root, base)
    taken, elsewhere = [], []
    with tempfile.TemporaryDirectory(prefix="reprotune-sweep-") as scratch:
        for entry in entries:
            if entry.baseline_rev != base:
                elsewhere.append(entry.name or entry.stash_rev[:7])
                continue
            changed = git(["diff", "--name-only", "-z", "--no-renames", base, entry.stash_rev], root).split("\0")
            files = {path: show(root, entry.stash_rev, path) for path in changed
                     if path and not path.startswith(".dvc/tmp/") and not is_output(path, outputs)}
            targets: tuple[str, ...] = ()
            packed = blob(root, entry.stash_rev, ".dvc/tmp/repro.dat")
            if packed is not None:
                args = Path(scratch) / "repro.dat"
                args.write_bytes(packed)
                targets = tuple(BaseExecutor.unpack_repro_args(str(args))[1].get("targets") or ())
            name = ref_safe(entry.name) if entry.name else f"queued-{entry.stash_rev[:7]}"
            taken.append(Experiment(name, (), files, targets, queued=entry.stash_rev))
    return taken, elsewhere


def output_paths(root: Path, rev: str) -> set[str]:
    """Every path dvc.lock names as a stage output at `rev` (results, not inputs), and dvc.lock."""
    text = show(root, rev, LOCK)
    lock = (yaml.safe_load(text) or {}) if text else {}
    outs = {LOCK}
    for stage in (lock.get("stages") or {}).values():
        outs |= {out["path"].rstrip("/") for out in stage.get("outs") or []}
    return outs


def is_output(path: str, outputs: set[str]) -> bool:
    return any(path == out or path.startswith(out + "/") for out in outputs)


# ------------------------------------------------------------------------------ what already exists

def existing(root: Path, base: str, git_url: str) -> tuple[dict[str, str], dict[str, str]]:
    """The experiments of the base commit here and on the git remote, each name -> commit (the
    remote's objects fetched, so they can be compared)."""
    prefix = exp_prefix(base)
    here = {ref.removeprefix(prefix): sha for sha, ref in _refs(git(["for-each-ref", "--format=%(objectname) "
                                                                     "%(refname)", prefix], root))}
    remote = {ref.removeprefix(prefix): sha
              for sha, ref in _refs(git(["ls-remote", git_url, f"{prefix}*"], root).replace("\t", " "))}
    if not all(_have(root, sha) for sha in remote.values()):
        scratch = f"{SCRATCH_REFS}/{base[:12]}/"
        try:
            git(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", git_url,
                 f"+{prefix}*:{scratch}*"], root)
        finally:
            for _, ref in _refs(git(["for-each-ref", "--format=%(objectname) %(refname)", scratch], root)):
                git(["update-ref", "-d", ref], root, check=False)
    return here, remote


def _refs(listing: str) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in listing.splitlines() if line.strip()]  # type: ignore[misc]


def _have(root: Path, sha: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=root, capture_output=True).returncode == 0


@dataclass(frozen=True)
class _Made:
    """What an experiment commit holds, whatever experiment it is compared with."""
    parent: str
    changed: frozenset[str]  # paths it changes against its parent
    outputs: frozenset[str]  # its dvc.lock's outputs, and dvc.lock
    ran: tuple[str, ...] | None  # the stages it ran (its targets); None: the whole pipeline


@functools.cache
def _made(root: Path, commit: str) -> _Made:
    """Read once per commit (a commit never changes): a sweep compares every experiment with every
    existing one, which would otherwise read each commit's parent, diff, dvc.lock and message again."""
    parent = git(["rev-parse", f"{commit}^"], root, check=False).strip()
    changed = git(["diff", "--name-only", "-z", "--no-renames", parent, commit], root, check=False).split("\0")
    message = git(["log", "-1", "--format=%B", commit], root)
    ran = next((tuple(line.removeprefix(MESSAGE_TARGETS).split()) for line in message.splitlines()
                if line.startswith(MESSAGE_TARGETS)), ("all",))
    return _Made(parent, frozenset(filter(None, changed)), frozenset(output_paths(root, commit)),
                 None if ran == ("all",) else ran)


@functools.cache
def _committed(root: Path, commit: str, path: str) -> str | None:
    """A file's text in an experiment commit, read once: every planned experiment is compared with it."""
    return show(root, commit, path)


def matches(root: Path, base: str, commit: str, experiment: Experiment) -> bool:
    """Whether an experiment commit is this experiment: made on the base commit, with the same
    changed inputs and nothing else changed but results (dvc.lock and stage outputs), and run for
    the same stages (or the whole pipeline)."""
    if not _have(root, commit):
        return False
    made = _made(root, commit)
    if made.parent != base or made.ran not in (None, experiment.targets):
        return False
    if any(path not in experiment.files and not is_output(path, made.outputs) for path in made.changed):
        return False
    return all(_committed(root, commit, path) == text for path, text in experiment.files.items())


def split_done(root: Path, base: str, experiments: list[Experiment], known: dict[str, str]
               ) -> tuple[list[Experiment], dict[str, str]]:
    """The experiments still to run, and those that already exist (name -> the existing one's name).
    A name that an existing, different experiment holds gets a suffix (-2, -3, ...)."""
    todo, done, taken = [], {}, set(known)
    for experiment in experiments:
        same = next((name for name, sha in known.items() if matches(root, base, sha, experiment)), None)
        if same is not None:
            done[experiment.name] = same
            continue
        name = free_name(experiment.name, taken)
        taken.add(name)
        todo.append(dataclasses.replace(experiment, name=name))
    return todo, done
