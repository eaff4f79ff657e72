"""`reprotune sweep`'s driver: plan the experiments, run the missing ones as Ray tasks (one per
experiment, with the CPUs and GPUs it asked for, retried elsewhere if its node dies), show their
progress, and pull what they pushed so the experiments appear here as if run here.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from reprotune.errors import Interrupted, ReprotuneError, first_line
from reprotune.sweep import plan
from reprotune.sweep.plan import Experiment, git
from reprotune.sweep.worker import Origin, run_experiment

LOGS = Path(".dvc/tmp/reprotune-sweep")  # each experiment's full log, kept beside DVC's own queue logs
SUMMARY_EVERY_S = 30.0
CANCEL_WAIT_S = 40.0  # a stopped experiment's processes pause and exit within the worker's grace


@dataclass(frozen=True)
class Options:
    sets: list[str]
    targets: tuple[str, ...] = ()
    queued: bool = False
    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    retries: int = 3
    git_remote: str = "origin"
    dvc_remote: str | None = None
    workdir: str = ""


def sweep(root: Path, options: Options, dvc: str, env: dict[str, str],
          say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run a sweep from the repository at `root`; returns what each experiment that ran gave (name ->
    status, seconds, seconds per step). Raises ReprotuneError (one line) if any experiment failed,
    Interrupted on Ctrl-C, once everything that finished has been pulled."""
    origin = _origin(root, options)
    experiments = plan.grid(root, origin.base, options.sets, options.targets) if options.sets else []
    elsewhere: list[str] = []
    if options.queued:
        taken, elsewhere = plan.queued(root, origin.base)
        experiments += taken
    if not experiments:
        raise ReprotuneError("nothing to sweep: give a grid (-S train.lr=0.01,0.03) or --queued with experiments "
                             "in DVC's queue (dvc exp run --queue)" + (f"; queued on other commits, left there: "
                                                                      f"{', '.join(elsewhere)}" if elsewhere else ""))
    here, remote = plan.existing(root, origin.base, origin.git_url)
    todo, done = plan.split_done(root, origin.base, experiments, here | remote)
    say(f"sweep: {len(experiments)} experiments on {origin.base[:7]} ({options.git_remote}: {origin.git_url}); "
        f"{len(done)} already exist, {len(todo)} to run")
    for name, same in done.items():
        say(f"  {name}: exists" + (f" (as {same})" if same != name else ""))
    if elsewhere:
        say(f"  left in DVC's queue (queued on another commit): {', '.join(elsewhere)}")
    results: dict[str, dict] = {}
    interrupted = False
    if todo:
        try:
            results = _run(root, todo, origin, options, say)
        except _Interrupted as stop:
            results, interrupted = stop.results, True
    finished = [r["name"] for r in results.values() if r["status"] in ("done", "exists")]
    missing = [name for name in done.values() if name not in here]  # on the remote only: bring them here
    _pull(root, origin, [*finished, *missing], dvc, env, say)
    _dequeue(root, [e.queued for e in experiments if e.queued and (e.name in finished or e.name in done)], dvc, env)
    failed = [r for r in results.values() if r["status"] == "failed"]
    if interrupted:
        raise Interrupted(f"sweep interrupted: {len(finished)} of {len(todo)} experiments finished and pulled, "
                          f"the others cancelled; the same command runs the rest")
    if failed:
        raise ReprotuneError(f"{len(failed)} of {len(todo)} experiments failed: "
                             + ", ".join(f"{r['name']} ({r['error']}; log: {r['logfile']})" for r in failed))
    say(f"sweep done: {len(finished)} run, {len(done)} already there; compare them with `reprotune experiments`")
    return {name: {k: v for k, v in r.items() if k != "log"} for name, r in results.items()}


def _origin(root: Path, options: Options) -> Origin:
    """The base commit (HEAD, clean, on the git remote), the git remote's URL and the DVC remote."""
    if not (root / ".dvc").is_dir():
        raise ReprotuneError(f"{root}: not a DVC repository (run reprotune sweep in the project's root)")
    base = git(["rev-parse", "HEAD"], root).strip()
    dirty = [line[3:] for line in git(["status", "--porcelain", "--untracked-files=no"], root).splitlines()]
    if dirty:
        raise ReprotuneError(f"uncommitted changes ({', '.join(dirty[:5])}{', ...' if len(dirty) > 5 else ''}): "
                             f"a sweep runs the base commit as the git remote has it; commit and push them first")
    url = git(["remote", "get-url", options.git_remote], root, check=False).strip()
    if not url:
        raise ReprotuneError(f"no git remote {options.git_remote!r}: the experiments go to the team's git remote "
                             f"(`git remote add {options.git_remote} URL`, or --git-remote NAME)")
    if "://" not in url and not _scp_like(url):  # a path: the workers need it whole
        url = str((root / url).resolve())
    # Branches and tags: what `git clone` fetches (an experiment ref on the remote holds the commit too,
    # but a clone does not fetch refs/exps/).
    tips = [line.split()[0] for line in git(["ls-remote", "--heads", "--tags", url], root).splitlines()
            if line.strip()]
    if not any(_contains(root, tip, base) for tip in tips):
        raise ReprotuneError(f"commit {base[:7]} is not on the git remote {options.git_remote} ({url}): "
                             f"the workers clone it from there; `git push {options.git_remote} HEAD` first "
                             f"(or `git fetch {options.git_remote}` if it is there already)")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = options.dvc_remote or repo.config["core"].get("remote")
        remotes = repo.config["remote"]
        if not name:
            raise ReprotuneError("no DVC remote: the workers pull the data from it and push the results to it "
                                 "(`dvc remote add -d NAME URL`, or --dvc-remote NAME)")
        if name not in remotes:
            raise ReprotuneError(f"no DVC remote {name!r} (`dvc remote list` shows: "
                                 f"{', '.join(remotes) or 'none'})")
        dvc_url = remotes[name]["url"]  # DVC resolves a relative path against its config file: absolute
    return Origin(base, url, name, str(dvc_url), options.workdir)


def _scp_like(url: str) -> bool:
    """git's user@host:path form (a colon before any slash)."""
    head = url.split("/", 1)[0]
    return ":" in head and not Path(url).exists()


def _contains(root: Path, tip: str, base: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", base, tip], cwd=root,
                          capture_output=True).returncode == 0


def _divert_ray_errors(path: Path, say: Callable[[str], None]) -> None:
    """Ray prints the errors its cluster reports (a node's death: "Raylet is terminated ..." and 20
    lines of its state dump; each retry) on the driver's terminal, between the progress lines, with
    no switch to turn them off. They go to a file instead, each announced in one line."""
    from ray._private import worker as ray_worker

    printed = ray_worker.print_to_stdstream

    def divert(data: dict, ignore_prefix: bool = False) -> None:
        if data.get("pid") != "raylet":
            printed(data, ignore_prefix=ignore_prefix)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            out.write("\n".join(data.get("lines", [])) + "\n")
        first = next((line.strip() for text in data.get("lines", []) for line in text.splitlines() if line.strip()),
                     "an error")
        say(f"  ray: {first[:140]}{'...' if len(first) > 140 else ''} (all of it: {LOGS / path.name})")

    ray_worker.print_to_stdstream = divert


class _TokenNotice(logging.Filter):
    """Ray announces, on every start of a local cluster, that it protects it with a token: nothing
    to act on for a cluster on loopback that lives as long as the sweep."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class _Interrupted(Exception):
    def __init__(self, results: dict[str, dict]):
        self.results = results


def _run(root: Path, todo: list[Experiment], origin: Origin, options: Options, say: Callable[[str], None]
         ) -> dict[str, dict]:
    """Run the experiments on Ray; returns name -> the task's result, logs written under LOGS."""
    from reprotune.inference.cluster import own_process_groups, ray_environment

    if "ray" not in sys.modules:
        ray_environment(options.address)
    import ray

    if options.address is None:
        own_process_groups()  # Ctrl-C reaches the driver alone, which stops the tasks in order
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenNotice())
    try:  # "local": a Ray of our own, not whatever cluster `ray start` last started on this machine
        ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level="warning", configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError, ...
        raise ReprotuneError(f"--address {options.address}: cannot join the Ray cluster ({first_line(exc)})"
                             if options.address else f"cannot start Ray here ({first_line(exc)})") from None
    _divert_ray_errors(root / LOGS / "ray-errors.log", say)
    try:
        _check_resources(ray, options)
        progress = ray.remote(num_cpus=0)(Progress).options(scheduling_strategy=_here(ray)).remote()
        task = ray.remote(_task).options(num_cpus=options.cpus, num_gpus=options.gpus, max_retries=options.retries,
                                         retry_exceptions=False)
        say(f"ray: {_describe_cluster(ray)}, this driver on node {ray.get_runtime_context().get_node_id()[:6]}; "
            f"each experiment takes {options.cpus:g} CPU"
            + (f" and {options.gpus:g} GPU" if options.gpus else "") + f", retried up to {options.retries} times "
            "if its node dies")
        stop = StopWord(f"sweep-stop-{uuid.uuid4().hex}")
        pending = {task.remote(e, origin, progress, stop): e for e in todo}
        try:
            return _watch(ray, pending, progress, stop, say, len(todo), root / LOGS)
        finally:
            stop.forget()  # a long-lived cluster keeps its store
    finally:
        ray.shutdown()


def _task(experiment: Experiment, origin: Origin, progress, stop: StopWord) -> dict:
    """One experiment as a Ray task: run_experiment, reporting to the driver's progress actor (never
    waiting on it) and stopping when the driver says."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    where = f"node {node[:6]} ({ray.util.get_node_ip_address()})"

    def report(event: str) -> None:
        progress.add.remote(experiment.name, event, where)

    report("started")
    return run_experiment(experiment, origin, report, stop.said)


@dataclass(frozen=True)
class StopWord:
    """The driver's word to stop a sweep's tasks, in the cluster's key-value store (GCS), which the
    tasks read twice a second. Not ray.cancel: a cancel that crosses the task's own reply aborts the
    driver (Ray 2.60, seen in CI: "Check failed: it != submissible_tasks_.end() Tried to complete task
    that was not pending"; the same race for retries: ray-project/ray#54798). Not an actor the tasks
    ask either: a task waiting in ray.get or ray.wait lends its CPUs back, and Ray starts another
    experiment on them meanwhile. Ray's internal_kv is private API, pinned by constraints.txt."""
    key: str
    namespace = "reprotune"

    def say(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, b"stop", namespace=self.namespace)

    def said(self) -> bool:
        from ray.experimental.internal_kv import _internal_kv_exists

        return _internal_kv_exists(self.key, namespace=self.namespace)

    def forget(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.key, namespace=self.namespace)


class Progress:
    """The tasks' live status, collected where the driver runs (an actor holding no CPU)."""

    def __init__(self):
        self.events: list[tuple] = []

    def add(self, name: str, event: str, where: str) -> None:
        self.events.append((time.monotonic(), name, event, where))

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


def _here(ray):
    """Schedule on the driver's own node: the progress actor must not die with a worker node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _alive(ray) -> list[dict]:
    """The resources of each live node of the cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _check_resources(ray, options: Options) -> None:
    """An experiment no node can hold would wait forever: say so now."""
    nodes = _alive(ray)
    if not any(r.get("CPU", 0) >= options.cpus and r.get("GPU", 0) >= options.gpus for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes)
        raise ReprotuneError(f"no Ray node has {options.cpus:g} CPU and {options.gpus:g} GPU for one experiment "
                             f"(nodes: {have}): lower --cpus-per-trial/--gpus-per-trial or add nodes")


def _describe_cluster(ray) -> str:
    nodes = _alive(ray)
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    return f"{len(nodes)} node{'s' * (len(nodes) != 1)}, {cpus:g} CPUs, {gpus:g} GPUs"


def _watch(ray, pending: dict, progress, stop: StopWord, say: Callable[[str], None], total: int, logs: Path
           ) -> dict[str, dict]:
    """Wait for the tasks, printing each change of state as it happens and a summary line every
    SUMMARY_EVERY_S; Ctrl-C stops what runs (each task stops its processes) and raises _Interrupted."""
    start = time.monotonic()
    results: dict[str, dict] = {}
    running: dict[str, tuple[float, str]] = {}  # name -> (since, doing)
    attempts: dict[str, int] = {}
    last_summary = start

    def stamp(at: float | None = None) -> str:
        seconds = int((at or time.monotonic()) - start)
        return f"[{seconds // 60:2d}:{seconds % 60:02d}]"

    def drain() -> None:
        for at, name, event, where in ray.get(progress.take.remote()):
            if name in results:
                continue
            if event == "started":
                attempts[name] = attempts.get(name, 0) + 1
                again = f" (attempt {attempts[name]}: the last one's worker or node died)" if attempts[name] > 1 else ""
                running[name] = (at, "starting")
                say(f"{stamp(at)} {name}: running on {where}{again}")
            elif name in running:
                running[name] = (running[name][0], event)
                if event.startswith("stage "):
                    say(f"{stamp(at)} {name}: {event}")

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            drain()
            for ref in ready:
                experiment = pending.pop(ref)
                result = _outcome(ray, ref, experiment)
                results[experiment.name] = result
                running.pop(experiment.name, None)
                _report(result, stamp(), say, logs)
            if time.monotonic() - last_summary >= SUMMARY_EVERY_S and pending:
                now = last_summary = time.monotonic()
                busy = ", ".join(f"{n} ({doing}, {int(now - since)} s)" for n, (since, doing) in running.items())
                counts = _counts(results)
                say(f"{stamp()} {counts['done']} done, {counts['failed']} failed, {len(running)} running"
                    + (f" ({busy})" if busy else "") + f", {len(pending) - len(running)} waiting, of {total}")
    except KeyboardInterrupt:
        say(f"{stamp()} interrupted: stopping {len(pending)} experiments (their processes pause and exit) ...")
        # Each task returns "cancelled" once its processes have stopped (one still queued, at once).
        try:
            stop.say()
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
        except KeyboardInterrupt:
            pass
        for ref in ray.wait(list(pending), num_returns=len(pending), timeout=0)[1]:
            ray.cancel(ref, force=True)  # the last resort, for a task that did not stop in time
        for ref, experiment in pending.items():
            outcome = _outcome(ray, ref, experiment, timeout=1.0)
            if outcome["status"] in ("done", "exists"):  # it finished before the cancel reached it
                results[experiment.name] = outcome
        raise _Interrupted(results) from None
    return results


def _outcome(ray, ref, experiment: Experiment, timeout: float | None = None) -> dict:
    """A task's result; a task that raised, or whose node died more often than it may retry, counts
    as a failed experiment with the reason."""
    from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError

    try:
        result = ray.get(ref, timeout=timeout)
    except (GetTimeoutError, TaskCancelledError):
        return {"name": experiment.name, "status": "cancelled", "log": ""}
    except RayTaskError as exc:
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return {"name": experiment.name, "status": "failed", "error": f"the task raised: {cause}", "log": str(exc)}
    except RayError as exc:  # worker or node lost more times than --retries allows; Ray's story in the log
        return {"name": experiment.name, "status": "failed", "log": str(exc),
                "error": f"its worker or node died on every attempt ({type(exc).__name__}; --retries allows more)"}
    return result


def _report(result: dict, stamp: str, say: Callable[[str], None], logs: Path) -> None:
    """One line per finished experiment (a failed one with its log's last lines); its log saved."""
    logs.mkdir(parents=True, exist_ok=True)
    logfile = logs / f"{result['name']}.log"
    logfile.write_text(result.get("log", ""))
    result["logfile"] = str(LOGS / logfile.name)  # as the user, in the project's root, types it
    seconds = f" in {result['seconds']:.0f} s" if "seconds" in result else ""
    if result["status"] == "done":
        say(f"{stamp} {result['name']}: done{seconds}, pushed")
    elif result["status"] == "exists":
        say(f"{stamp} {result['name']}: done (an earlier attempt pushed it)")
    else:
        tail = [line for line in result.get("log", "").splitlines() if line.strip()][-15:]
        say(f"{stamp} {result['name']}: FAILED{seconds}: {result.get('error', result['status'])}; "
            f"log: {result['logfile']}")
        for line in tail:
            say(f"    | {line}")


def _counts(results: dict[str, dict]) -> dict[str, int]:
    return {"done": sum(r["status"] in ("done", "exists") for r in results.values()),
            "failed": sum(r["status"] == "failed" for r in results.values())}


def _pull(root: Path, origin: Origin, names: list[str], dvc: str, env: dict[str, str],
          say: Callable[[str], None]) -> None:
    """Bring the experiments here (git refs and their outputs), as `dvc exp pull` does for a teammate's."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    refs = [plan.exp_prefix(origin.base) + name for name in names]  # a bare name may be another commit's too
    with _remote_url_pinned(root, origin):
        proc = subprocess.run([dvc, "exp", "pull", "-r", origin.dvc_remote, origin.git_url, *refs], cwd=root,
                              env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReprotuneError(f"dvc exp pull of the sweep's experiments failed ({plan.complaint(proc)}); they are "
                             f"on the remotes: `dvc exp pull {origin.git_url} {' '.join(names)}`")
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith(("WARNING", "ERROR")):  # e.g. outputs missing from the DVC remote: say so
            say(f"  dvc exp pull: {line}")
    say(f"pulled {len(names)} experiment{'s' * (len(names) != 1)}: {', '.join(names)}")


@contextlib.contextmanager
def _remote_url_pinned(root: Path, origin: Origin) -> Iterator[None]:
    """For the pull, the DVC remote's URL as resolved here, in .dvc/config.local (put back after).

    DVC reads the remote of an experiment from that commit's .dvc/config, and resolves a relative
    path there against the commit's tree, not this directory (DVC 3.67: `url = ../../store` became
    `/store`), so `dvc exp pull` fetched the refs and none of the outputs, with only a warning. The
    local config is read from the workspace and overrides the commit's."""
    from configobj import ConfigObj

    local = root / ".dvc" / "config.local"
    before = local.read_bytes() if local.exists() else None
    config = ConfigObj(str(local))
    section = config.setdefault(f'remote "{origin.dvc_remote}"', {})
    if "url" in section:  # the user's own setting, already resolved here
        yield
        return
    section["url"] = origin.dvc_url
    config.write()
    try:
        yield
    finally:
        if before is None:
            local.unlink(missing_ok=True)
        else:
            local.write_bytes(before)


def _dequeue(root: Path, stashes: list[str], dvc: str, env: dict[str, str]) -> None:
    """Queued experiments that the sweep ran (their stash commits) leave DVC's queue (`dvc queue start`
    would run them again)."""
    if stashes:
        subprocess.run([dvc, "queue", "remove", *stashes], cwd=root, env=env, capture_output=True)

