"""One experiment on one node: clone the base commit from the git remote, run the experiment through
DVC (unchanged stages' outputs pulled from the DVC remote), publish it with `dvc exp push`.

Plain Python, no Ray: the driver runs `run_experiment` as a Ray task, and tests can call it alone.
Every command runs under a small supervisor in a process group of its own, so that nothing outlives
the task: a stopped task (the sweep interrupted) stops the group as Ctrl-C would (stages pause and
exit), and if the task's process dies (its node lost, Ray killing it and its children) the
supervisor sees it gone and stops the group.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from reprotune.sweep.plan import Experiment, exp_prefix, git, matches
from reprotune.tools import tool, venv_env

LOG_KEEP = 1_000_000  # characters of an experiment's log sent back to the driver (its end)
STOP_GRACE_S = 20.0  # a stopped experiment's processes get this long to pause and exit before SIGKILL


@dataclass(frozen=True)
class Origin:
    """Where a sweep's experiments start from and go to, the same for every task."""
    base: str  # the commit, as on the git remote
    git_url: str
    dvc_remote: str  # the DVC remote's name, and its URL (absolute, as the driver resolved it)
    dvc_url: str
    workdir: str = ""  # on each node: clones, logs and a DVC cache the node's tasks share; "" = a temp dir


Report = Callable[[str], None]
Stopping = Callable[[], bool]  # asked between and during commands: has the sweep been interrupted?


class Stopped(Exception):
    """The sweep asked this experiment to stop; its processes have."""


def workdir(origin: Origin) -> Path:
    return Path(origin.workdir) if origin.workdir else Path(tempfile.gettempdir()) / "reprotune-sweep"


def run_experiment(experiment: Experiment, origin: Origin, report: Report = lambda _: None,
                   stopping: Stopping = lambda: False) -> dict:
    """Run one experiment in a fresh clone and push it. Returns {"name", "status": done | exists |
    failed | cancelled (`stopping` said so), "seconds", "log", and "rev" (the experiment commit) or
    "error"}; raises only if interrupted (KeyboardInterrupt), once its processes have stopped. One that
    waited in Ray's queue while the sweep was stopped returns at its first command, before it runs."""
    root = workdir(origin)
    (root / "cache").mkdir(parents=True, exist_ok=True)
    _clear_stale(root)
    clone, held = claim(root, experiment.name)
    log = Path(f"{clone}.log")
    env = _env(clone)
    started = time.monotonic()
    steps: dict[str, float] = {}  # seconds per step: where a sweep's time goes (bench/sweep.py)

    def result(status: str, **extra) -> dict:
        text = log.read_text(errors="replace") if log.exists() else ""
        return {"name": experiment.name, "status": status, "seconds": time.monotonic() - started,
                "steps": steps, "log": text[-LOG_KEEP:], **extra}

    def step(label: str, command: list[str], cwd: Path) -> int:
        begun = time.monotonic()
        code = supervised(command, cwd, log, env, report, hold=held.fileno(), stopping=stopping)
        steps[label] = steps.get(label, 0.0) + time.monotonic() - begun
        return code

    try:
        report("cloning")
        clone_it = ["git", "clone", "--quiet", "--no-checkout", origin.git_url, str(clone)]
        check_out = ["git", "checkout", "--quiet", "--detach", origin.base]
        for label, command, cwd in (("clone", clone_it, root), ("checkout", check_out, clone)):
            if (code := step(label, command, cwd)) != 0:
                return result("failed", error=f"`{' '.join(command[:3])}` exited {code}")
        _configure(clone, origin, root / "cache")
        ref = exp_prefix(origin.base) + experiment.name
        begun = time.monotonic()
        remote_rev = _remote_rev(clone, origin.git_url, ref)
        steps["check remote"] = time.monotonic() - begun
        if remote_rev:  # pushed by an earlier attempt of this task (its node died after the push)
            if matches(clone, origin.base, remote_rev, experiment):
                return result("exists", rev=remote_rev)
            return result("failed", error=f"the git remote already has a different experiment named "
                                          f"{experiment.name}")
        if not experiment.overrides:  # from the queue: its changed inputs (a -S grid passes its -S)
            _write(clone, experiment.files)
        run = [tool("dvc"), "exp", "run", "--pull", "-n", experiment.name, "-m", experiment.message,
               *(arg for o in experiment.overrides for arg in ("-S", o)), *experiment.targets]
        report("running")
        if (code := step("run", run, clone)) != 0:
            return result("failed", error=f"dvc exp run exited {code}")
        report("pushing")
        push = [tool("dvc"), "exp", "push", "-r", origin.dvc_remote, origin.git_url, experiment.name]
        if (code := step("push", push, clone)) != 0:
            return result("failed", error=f"dvc exp push exited {code}")
        return result("done", rev=git(["rev-parse", ref], clone).strip())
    except Stopped:
        return result("cancelled")
    finally:
        _remove(clone)
        held.close()


def claim(root: Path, name: str) -> tuple[Path, IO]:
    """A new clone directory under `root` for experiment `name`, and its lock, held (open file) for the
    task's life: the kernel lets go when every process holding it is gone, however they die. Locked
    before it takes its name, so another task's _clear_stale never sees it unheld."""
    clone = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=root))
    held = open(f"{clone}.locking", "w")  # noqa: SIM115
    fcntl.flock(held, fcntl.LOCK_EX)
    os.rename(f"{clone}.locking", f"{clone}.lock")
    return clone, held


def _clear_stale(root: Path) -> None:
    """Remove the clones of tasks that died (a lost node's task cannot clean up after itself; its
    retry may run elsewhere): a clone whose lock no process holds. The supervisors hold it too, so a
    clone whose task died stays while its commands are still stopping (they write into it as they
    exit: removed under them, the clone came back without its lock, never to be cleared)."""
    for lock in root.glob("*.lock"):
        with open(lock) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live task's
            _remove(Path(str(lock).removesuffix(".lock")))


def _remove(clone: Path) -> None:
    shutil.rmtree(clone, ignore_errors=True)
    for suffix in (".log", ".lock"):
        Path(f"{clone}{suffix}").unlink(missing_ok=True)


def _write(clone: Path, files: dict[str, str | None]) -> None:
    for path, text in files.items():
        target = clone / path
        if text is None:
            target.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


def _configure(clone: Path, origin: Origin, cache: Path) -> None:
    """The clone's DVC settings of its own (.dvc/config.local, which git ignores): the team's DVC
    remote with its URL as the driver resolved it (a relative path in .dvc/config would point
    elsewhere from here) as the default, and the node's shared cache, so the data is pulled once per
    node, not once per experiment. Written directly (DVC's INI format) rather than by three `dvc
    config` processes: a second and a half per experiment."""
    (clone / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = {origin.dvc_remote}\n"
        f"['remote \"{origin.dvc_remote}\"']\n    url = {origin.dvc_url}\n"
        f"[cache]\n    dir = {cache}\n")


def _remote_rev(clone: Path, git_url: str, ref: str) -> str:
    """The commit the git remote has at `ref`, fetched into the clone; "" if none."""
    listed = git(["ls-remote", git_url, ref], clone).split()
    if not listed:
        return ""
    git(["fetch", "--quiet", "--no-tags", git_url, f"+{ref}:{ref}"], clone)
    return listed[0]


def _env(clone: Path) -> dict[str, str]:
    """The experiment's environment: this node's Python environment first on PATH (DVC runs each
    stage's `python` through the shell), the base commit's own code first on the import path (the
    node's install may be of another commit), and git never waiting for a password."""
    env = venv_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(clone / "src"), env.get("PYTHONPATH", "")]))
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


STAGE_LINE = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


def supervised(command: list[str], cwd: Path, log: Path, env: dict[str, str], report: Report,
               hold: int | None = None, stopping: Stopping = lambda: False) -> int:
    """Run `command` under SUPERVISOR, appending its output to `log`; report each DVC stage it starts.
    When `stopping()` says so, stop its process group and raise Stopped; if this is interrupted (a
    KeyboardInterrupt), stop the group first too. `hold`: a file descriptor (the clone's lock) the
    supervisor keeps open until its group has stopped."""
    if stopping():
        raise Stopped
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        start = out.tell()  # what this command writes begins here
        proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(-1 if hold is None else hold), *command],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=() if hold is None else (hold,))
    try:
        with open(log, errors="replace") as text:
            text.seek(start)
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    code = None
                for stage in STAGE_LINE.findall(text.read()):
                    report(f"stage {stage}")
                if code is not None:
                    return code
                if stopping():
                    raise Stopped
    except BaseException:
        proc.terminate()  # the supervisor stops the whole group: SIGINT, then SIGKILL after a grace
        try:
            proc.wait(STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            proc.kill()  # the waiter: its supervisor, seeing it gone, stops the group all the same
        raise


# The supervisor, in two processes. Ray SIGKILLs a dying worker's children (its
# kill_child_processes_on_worker_exit: a lost node's task, a force-cancelled one), so what stops the
# command cannot be the task's child: that one, the waiter, only passes on SIGTERM and the exit code,
# and leaves if the task dies without killing it. Its child, the supervisor, leads the process group
# holding the command and everything it starts, and stops the group (SIGINT as Ctrl-C, SIGKILL after
# a grace) when asked or when the waiter is gone; it holds the clone's lock (argv[1]; -1: none) until
# then. The Ray worker's blocked SIGINT is unblocked first, or the command would never see it.
# Stdlib only, run with `python -c`, so that it works whatever commit's code is on the import path.
SUPERVISOR = f"""
import os, signal, subprocess, sys, time
signal.pthread_sigmask(signal.SIG_SETMASK, ())  # Ray's worker blocks SIGINT; the command must get it
task, hold, stop = os.getppid(), int(sys.argv[1]), []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda *_: stop.append(1))
supervisor = os.fork()
if supervisor:  # the waiter
    if hold >= 0:
        os.close(hold)
    while True:
        done, status = os.waitpid(supervisor, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            sys.exit(code if code >= 0 else 128 - code)
        if stop:
            os.kill(supervisor, signal.SIGTERM)
            stop.clear()
        if os.getppid() != task:
            sys.exit(1)  # the task died: the supervisor sees this one go
        time.sleep(0.2)
os.setpgid(0, 0)
waiter = os.getppid()
child = subprocess.Popen(sys.argv[2:])
while child.poll() is None and not stop and os.getppid() == waiter:
    time.sleep(0.2)
if child.poll() is None:  # stopped, or the task is gone: the group goes, as with Ctrl-C first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.killpg(0, signal.SIGINT)
    deadline = time.monotonic() + {STOP_GRACE_S}
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)
sys.exit(child.returncode)
"""
