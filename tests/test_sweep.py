"""`reprotune sweep`: DVC experiments as Ray tasks, published to the team's remotes and pulled back.

The fast tests take the plan (DVC's grid syntax, names, what counts as the same experiment) and the
supervisor that keeps an experiment's processes from outliving it. The slow ones run the real thing:
a tiny project with a bare git repository as the team's remote and a directory as its DVC remote, a
two-node loopback Ray cluster, one node killed in the middle, a failing experiment from DVC's queue,
a repeat that runs nothing, a local `dvc exp run` the sweep must match bit for bit, and Ctrl-C.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fixtures import REPO, env, events, listening, loopback, make_project, run, team_project, two_node_cluster
from reprotune.errors import ReprotuneError
from reprotune.sweep import driver, plan
from reprotune.tracking.board import gather

REPROTUNE = str(Path(sys.executable).parent / "reprotune")
GRID = ["-S", "train.lr=0.02,0.03,0.04"]
# The grid's three, and one from DVC's queue (with a failing one beside it).
NAMES = {"lr0.02", "lr0.03", "lr0.04", "smoothed"}


# -------------------------------------------------------------------------------------------- the plan

@pytest.fixture
def repo(tmp_path) -> tuple[Path, str]:
    """A git repository holding the project's params.yaml and one stage file, committed: (root, base)."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (root / "stage.py").write_text("print('stage')\n")
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "base"], root)
    return root, run(["git", "rev-parse", "HEAD"], root).stdout.strip()


def test_a_grid_is_dvcs_sweep_syntax_named_by_what_varies(repo):
    root, base = repo
    experiments = plan.grid(root, base, ["train.lr=0.003,0.01", "seed=range(1,3)", "train.epochs=3"], ("evaluate",))
    assert [e.name for e in experiments] == ["lr0.003-seed1", "lr0.003-seed2", "lr0.01-seed1", "lr0.01-seed2"]
    first = experiments[0]
    assert first.overrides == ("train.lr=0.003", "seed=1", "train.epochs=3") and first.targets == ("evaluate",)
    params = yaml.safe_load(first.files["params.yaml"])
    assert (params["train"]["lr"], params["seed"], params["train"]["epochs"]) == (0.003, 1, 3)
    # What `dvc exp run -S` writes: the three values changed, every other line (comments too) as it was.
    before = (root / "params.yaml").read_text().splitlines()
    after = first.files["params.yaml"].splitlines()
    assert len(before) == len(after) and sum(a != b for a, b in zip(before, after, strict=True)) == 3
    # Two varying keys with the same last part keep their sections.
    clash = plan.grid(root, base, ["train.lr=0.1,0.2", "compress.lr=0.1,0.2"], ())
    assert clash[1].name == "train_lr0.1-compress_lr0.2"


@pytest.mark.parametrize(("sets", "message"), [
    (["train.lr=abc,0.01"], "-S train.lr=abc: params.yaml: train.lr: Input should be a valid number"),
    (["train.lrr=0.1"], "-S train.lrr=0.1: Could not override 'train.lrr'"),
    (["train.lr"], "-S: not a valid override"),
    (["other.yaml:x=1"], "-S other.yaml:x=1: the base commit has no other.yaml"),
])
def test_a_grid_that_reprotune_or_dvc_would_reject_stops_before_anything_runs(repo, sets, message):
    root, base = repo
    with pytest.raises(ReprotuneError) as failed:
        plan.grid(root, base, sets, ())
    assert str(failed.value).startswith(message), failed.value


def test_an_experiment_is_the_same_only_with_the_same_inputs_code_and_stages(repo):
    root, base = repo
    lr = plan.grid(root, base, ["train.lr=0.02"], ("evaluate",))[0]

    def experiment_commit(changes: dict[str, str], message: str) -> str:
        """A commit on the base as DVC makes an experiment: the changes, results, message."""
        run(["git", "checkout", "-q", "--detach", base], root)
        for path, text in changes.items():
            (root / path).parent.mkdir(exist_ok=True)
            (root / path).write_text(text)
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-q", "-m", message], root)
        return run(["git", "rev-parse", "HEAD"], root).stdout.strip()

    lock = yaml.safe_dump({"schema": "2.0", "stages": {"evaluate": {"outs": [{"path": "metrics/evaluate.json"}]}}})
    results = {"dvc.lock": lock, "metrics/evaluate.json": '{"test_acc": 0.5}'}
    same = experiment_commit({**lr.files, **results}, lr.message)
    assert plan.matches(root, base, same, lr)
    assert plan.matches(root, base, experiment_commit({**lr.files, **results}, "dvc: commit experiment"), lr)
    other_value = plan.grid(root, base, ["train.lr=0.03"], ("evaluate",))[0]
    assert not plan.matches(root, base, same, other_value)
    assert not plan.matches(root, base, experiment_commit({**lr.files, **results, "stage.py": "print(2)\n"},
                                                          lr.message), lr)
    whole = plan.Experiment(lr.name, lr.overrides, lr.files, ())
    assert not plan.matches(root, base, same, whole)  # run up to evaluate is not the whole pipeline
    todo, done = plan.split_done(root, base, [lr, other_value], {lr.name: same, other_value.name: same})
    assert done == {lr.name: lr.name} and [e.name for e in todo] == [f"{other_value.name}-2"]


def test_what_a_sweep_needs_is_checked_first_each_in_one_line(tmp_path):
    """The commit clean and on the git remote, a DVC remote, something to run: each missing piece is
    one line saying what to do, before any machine is used."""
    root = make_project(tmp_path / "user")

    def refused() -> str:
        with pytest.raises(ReprotuneError) as failed:
            driver.sweep(root, driver.Options(["train.lr=0.01,0.02"]), "dvc", env(), say=lambda _: None)
        return str(failed.value)

    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n")
    assert refused().startswith("uncommitted changes (params.yaml): a sweep runs the base commit as the git "
                                "remote has it; commit and push them first")
    run(["git", "checkout", "params.yaml"], root)
    assert refused().startswith("no git remote 'origin': the experiments go to the team's git remote")
    run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], tmp_path)
    run(["git", "remote", "add", "origin", "../origin.git"], root)
    assert refused() == (f"commit {run(['git', 'rev-parse', '--short=7', 'HEAD'], root).stdout.strip()} is not on "
                         f"the git remote origin ({tmp_path / 'origin.git'}): the workers clone it from there; "
                         "`git push origin HEAD` first (or `git fetch origin` if it is there already)")
    run(["git", "push", "-q", "origin", "HEAD:refs/exps/ab/cd/held-by-an-experiment"], root)
    assert refused().startswith(f"commit {run(['git', 'rev-parse', '--short=7', 'HEAD'], root).stdout.strip()} "
                                "is not on the git remote")  # a clone fetches branches and tags, not refs/exps/
    run(["git", "push", "-q", "origin", "main"], root)
    assert refused().startswith("no DVC remote: the workers pull the data from it and push the results to it")
    config = (root / ".dvc/config").read_text().replace("[core]", "[core]\n    remote = shared")
    (root / ".dvc/config").write_text(config + "['remote \"shared\"']\n    url = ../../store\n")
    run(["git", "commit", "-qam", "a DVC remote"], root)
    run(["git", "push", "-q", "origin", "main"], root)
    with pytest.raises(ReprotuneError, match="^nothing to sweep: give a grid"):
        driver.sweep(root, driver.Options([]), "dvc", env(), say=lambda _: None)
    origin = driver._origin(root, driver.Options([]))
    assert (origin.git_url, origin.dvc_remote, origin.dvc_url) == (str(tmp_path / "origin.git"), "shared",
                                                                   str(tmp_path / "store"))


def test_an_experiment_no_node_can_hold_is_refused_rather_than_left_waiting():
    class Ray:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
                    {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]

    driver._check_resources(Ray, driver.Options([], cpus=8, gpus=1))
    with pytest.raises(ReprotuneError, match=r"^no Ray node has 4 CPU and 2 GPU for one experiment \(nodes: 8 "
                                             r"CPU/1 GPU\): lower --cpus-per-trial/--gpus-per-trial or add nodes"):
        driver._check_resources(Ray, driver.Options([], cpus=4, gpus=2))


# ---------------------------------------------------------------------------------- the supervisor

# A stand-in for `dvc exp run`: starts a grandchild (as DVC starts a stage), writes both pids, and on
# SIGINT (as Ctrl-C) records that it was asked to stop before exiting 130.
STAND_IN = """
import os, signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
def stop(*_):
    open("interrupted", "w").close()
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
open("pids", "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(300)
"""

# The task: runs the stand-in under the supervisor, as run_experiment runs dvc; the sweep's word to
# stop is a file here. Exits 3 if told it stopped. With SIGINT blocked, as Ray's worker runs a task.
TASK = """
import os, signal, sys
from pathlib import Path
from reprotune.sweep.worker import Stopped, supervised
if os.environ.get("BLOCK_SIGINT"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
try:
    supervised([sys.executable, "-c", sys.argv[1]], Path.cwd(), Path("log"), dict(os.environ), print,
               stopping=Path("stop").exists)
except Stopped:
    sys.exit(3)
"""


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["stopped", "interrupted", "killed", "killed with its children"])
def test_an_experiments_processes_never_outlive_its_task(tmp_path, how):
    """Stopped (the sweep interrupted) or interrupted (a KeyboardInterrupt in the task): the group gets
    SIGINT first, as with Ctrl-C. Killed (the task's process gone), also with its children (what Ray
    does as a worker exits): the supervisor sees it go and stops the group the same way."""
    blocked = {} if how == "interrupted" else {"BLOCK_SIGINT": "1"}
    task = subprocess.Popen([sys.executable, "-c", TASK, STAND_IN], cwd=tmp_path, env={**env(), **blocked})
    deadline = time.monotonic() + 30
    while not (tmp_path / "pids").exists() or not (tmp_path / "pids").read_text():
        assert time.monotonic() < deadline and task.poll() is None, "the stand-in did not start"
        time.sleep(0.1)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    if how == "stopped":
        (tmp_path / "stop").touch()
        assert task.wait(30) == 3, "supervised did not raise Stopped"
    elif how == "interrupted":
        task.send_signal(signal.SIGINT)
    else:
        kill_task(task, with_children=how == "killed with its children")
    task.wait(30)
    deadline = time.monotonic() + 10
    while any(running(p) for p in pids):
        assert time.monotonic() < deadline, f"left running after the task was {how}: {pids}"
        time.sleep(0.1)
    assert (tmp_path / "interrupted").exists(), "the command was not asked to stop (SIGINT) before the kill"



def kill_task(task: subprocess.Popen, with_children: bool) -> None:
    """SIGKILL the task's process, and first its children if asked (Ray's worker, exiting, SIGKILLs
    its children: kill_child_processes_on_worker_exit)."""
    if with_children:
        for child in psutil.Process(task.pid).children():
            child.kill()
    task.kill()


# A stand-in for an interrupted `dvc exp run` that writes into its repository (absolute paths, as
# DVC's) while it exits: if the clone were removed meanwhile, this would bring it back without its lock.
SLOW_STOP = """
import os, signal, sys, time
def stop(*_):
    time.sleep(1.5)
    os.makedirs(os.path.join(CLONE, ".dvc", "tmp"), exist_ok=True)
    sys.exit(130)
CLONE = os.getcwd()
signal.signal(signal.SIGINT, stop)
open("pid", "w").write(str(os.getpid()))
time.sleep(300)
"""

# A task on a node: claims a clone as run_experiment does and runs the stand-in in it.
CLAIMING_TASK = """
import os, sys
from pathlib import Path
from reprotune.sweep.worker import claim, supervised
clone, held = claim(Path(sys.argv[2]), "exp")
supervised([sys.executable, "-c", sys.argv[1]], clone, Path(f"{clone}.log"), dict(os.environ), print,
           hold=held.fileno())
"""


@pytest.mark.reliability
def test_a_dead_tasks_clone_is_cleared_once_its_commands_have_stopped_not_before(tmp_path):
    """A node's next task clears the clones of dead tasks; one whose commands are still stopping (and
    writing) stays until they are gone, then goes whole."""
    from reprotune.sweep.worker import _clear_stale

    work = tmp_path / "work"
    work.mkdir()
    task = subprocess.Popen([sys.executable, "-c", CLAIMING_TASK, SLOW_STOP, str(work)], cwd=tmp_path, env=env())
    deadline = time.monotonic() + 30
    while not (pids := [p for p in work.glob("exp.*/pid") if p.read_text()]):
        assert time.monotonic() < deadline and task.poll() is None, "the stand-in did not start"
        time.sleep(0.1)
    clone, stand_in = pids[0].parent, int(pids[0].read_text())
    kill_task(task, with_children=True)  # its node lost: the supervisor sees it go and sends the group SIGINT
    task.wait(30)
    stopping = True
    while stopping or clone.exists():
        assert time.monotonic() < deadline + 30, f"not cleared: {sorted(p.name for p in work.iterdir())}"
        _clear_stale(work)  # another task starting on the node meanwhile
        stopping = running(stand_in)
        assert clone.is_dir() or not stopping, "cleared while its commands were still running"
        time.sleep(0.1)
    assert sorted(p.name for p in work.iterdir()) == []

@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Path:
    """A user's clone of a team project, its baseline pushed to its git and DVC remotes."""
    return team_project(tmp_path_factory.mktemp("team"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node loopback Ray cluster for this module's sweeps: (address, node ids, kill)."""
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def remote_experiments(root: Path) -> dict[str, str]:
    listed = run(["git", "ls-remote", "origin", "refs/exps/*"], root).stdout.split("\n")
    return {ref.rsplit("/", 1)[1]: sha for sha, ref in (line.split("\t") for line in listed if line)}


def shown(root: Path) -> dict[str, dict]:
    """`dvc exp show --json` here: experiment name -> its metrics files' data."""
    entries = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    return {exp["revs"][0]["name"]: exp["revs"][0]["data"]["metrics"]
            for entry in entries for exp in entry.get("experiments") or [] if exp["revs"][0].get("name")}


def cached_here(root: Path, name: str) -> list[str]:
    """The DVC-cached outputs of an experiment's finetune and evaluate that are in this clone's cache
    (`make tensorboard` and `dvc exp apply` need them here, not only on the remote)."""
    lock = yaml.safe_load(run(["git", "show", f"{_exp_rev(root, name)}:dvc.lock"], root).stdout)
    outs = [out for stage in ("finetune", "evaluate") for out in lock["stages"][stage]["outs"]
            if not out["path"].startswith("metrics/")]  # cache: false, in git
    return sorted(out["path"] for out in outs
                  if (root / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).exists())


def sweep(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([REPROTUNE, "sweep", *args], cwd=root, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(work: Path) -> list[str]:
    """Processes working inside a sweep's work directory: an experiment that outlived its task."""
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        if (proc.info["cwd"] or "").startswith(str(work)):
            found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])}")
    return found


@pytest.mark.ray
@pytest.mark.dvc
@pytest.mark.reliability
def test_a_sweep_over_two_nodes_survives_a_lost_node_and_arrives_as_local_experiments(team, cluster, tmp_path):
    root, work = team, tmp_path / "work"
    address, _, kill = cluster
    run(["dvc", "exp", "run", "--queue", "-n", "smoothed", "-S", "train.label_smoothing=0.1", "evaluate"], root)
    run(["dvc", "exp", "run", "--queue", "-n", "diverges", "-S", "train.lr=1e6", "evaluate"], root)  # NaN loss
    proc = sweep(root, *GRID, "--queued", "evaluate", "--address", address, "--workdir", str(work))
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    lines, driver, victim = [], None, None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if found := re.search(r"this driver on node (\w+)", line):
            driver = found[1]
        running = re.search(r"\] (\S+): running on node (\w+)", line)
        if running and victim is None and running[2] != driver and running[1] in NAMES:
            victim = running[1], running[2]
        if victim and f"] {victim[0]}: stage finetune" in line and "killed" not in lines:
            kill(victim[1])  # mid-training: the experiment's processes die with the node's task
            lines.append("killed")
    code = proc.wait()
    watchdog.cancel()
    out = "\n".join(lines)
    assert victim and "killed" in lines, out
    assert code == 1, out
    # Ray's own report of the lost node (its state dump) went to a file, announced in a line.
    assert "[state-dump]" not in out and "(all of it: .dvc/tmp/reprotune-sweep/ray-errors.log)" in out, out
    assert "Raylet is terminated" in (root / ".dvc/tmp/reprotune-sweep/ray-errors.log").read_text()
    retried = rf"\] {re.escape(victim[0])}: running on node \w+ .*attempt 2: the last one's worker or node died"
    assert re.search(retried, out), out
    # The failed experiment: reported with its log's end, the others unaffected; its full log kept.
    assert re.search(r"\] diverges: FAILED in \d+ s: dvc exp run exited", out), out
    assert "training loss became nan" in out
    assert "training loss became nan" in (root / ".dvc/tmp/reprotune-sweep/diverges.log").read_text()
    assert out.splitlines()[-1].startswith("reprotune: error: 1 of 5 experiments failed: diverges (")
    assert set(remote_experiments(root)) == NAMES
    metrics = shown(root)
    assert NAMES <= set(metrics)
    for name in NAMES:
        assert 0 <= metrics[name]["metrics/evaluate.json"]["data"]["test_acc"] <= 1
        assert cached_here(root, name) == ["models/model.pt", "models/reference.pt", "runs/evaluate", "runs/finetune"]
    queue = run(["dvc", "queue", "status"], root).stdout
    assert "diverges" in queue and "smoothed" not in queue, queue  # done leaves the queue, failed stays
    assert leftovers(work) == []
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # every clone removed, the lost node's too


@pytest.mark.dvc
def test_a_repeated_sweep_runs_nothing_and_fetches_what_only_the_remote_has(team, tmp_path):
    before = remote_experiments(team)
    assert NAMES <= set(before), "runs after the two-node sweep"
    again = run([REPROTUNE, "sweep", *GRID, "evaluate", "--workdir", str(tmp_path)], team)
    assert "3 experiments on" in again.stdout and "3 already exist, 0 to run" in again.stdout, again.stdout
    assert "ray:" not in again.stdout and "pulled" not in again.stdout  # no cluster started, nothing to fetch
    # A teammate's clone has none of them: the same sweep there runs nothing either, and brings them.
    run(["dvc", "exp", "remove", "lr0.04"], team)
    again = run([REPROTUNE, "sweep", *GRID, "evaluate", "--workdir", str(tmp_path)], team)
    assert "3 already exist, 0 to run" in again.stdout and "pulled 1 experiment: lr0.04" in again.stdout, again.stdout
    assert NAMES <= set(shown(team))
    assert len(cached_here(team, "lr0.04")) == 4
    assert remote_experiments(team) == before
    # `make tensorboard` shows them (run up to evaluate: their finetune and evaluate runs).
    board = gather(team, tmp_path / "board")
    for name in NAMES:
        assert {"finetune", "evaluate"} <= {p.name for p in board[name].iterdir()}, name
        assert "train/loss" in events(board[name] / "finetune").Tags()["scalars"], name


@pytest.mark.dvc
def test_a_swept_experiment_equals_the_same_dvc_exp_run_here(team):
    """Bit for bit, with the same threads (the sweep gives each experiment --cpus-per-trial, here 1):
    every output of finetune and evaluate (the model, the drift reference, every metric), but
    TensorBoard's event files (wall-clock times in them) and the timings in train.json and
    train_history.csv."""
    run(["dvc", "exp", "run", "--temp", "-n", "here", "-S", "train.lr=0.02", "evaluate"], team,
        extra_env={"OMP_NUM_THREADS": "1"})
    swept, here = (_exp_rev(team, name) for name in ("lr0.02", "here"))

    def outputs(rev: str) -> dict[str, str]:
        lock = yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], team).stdout)
        return {out["path"]: out.get("md5") for stage in ("finetune", "evaluate")
                for out in lock["stages"][stage]["outs"]}

    ours, theirs = outputs(swept), outputs(here)
    assert set(ours) == set(theirs)
    differ = sorted(path for path in ours if ours[path] != theirs[path] and not path.startswith("runs/"))
    assert differ == ["metrics/train.json", "metrics/train_history.csv"], differ
    for path in differ:  # these differ in their timings alone
        texts = [run(["git", "show", f"{rev}:{path}"], team).stdout for rev in (swept, here)]
        assert machine_free(path, texts[0]) == machine_free(path, texts[1]), path


MACHINE = {"train_seconds", "images_per_second", "achieved_tflops", "seconds", "peak_rss_mb"}  # timings, memory


def machine_free(path: str, text: str) -> list:
    if path.endswith(".json"):
        return sorted((k, v) for k, v in json.loads(text).items() if k not in MACHINE)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows, path
    return [{k: v for k, v in row.items() if k not in MACHINE} for row in rows]


def _exp_rev(root: Path, name: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"], root).stdout.split()
    assert len(refs) == 1, f"experiment {name}: {refs}"
    return refs[0]


@pytest.mark.ray
@pytest.mark.dvc
@pytest.mark.reliability
def test_ctrl_c_stops_every_experiment_and_leaves_no_process(team, cluster, tmp_path):
    """Also: without --address the sweep starts a Ray of its own, even with another cluster running
    on the machine (left to itself, ray.init joins the one `ray start` last started here: `cluster`,
    one of its two 1-CPU nodes killed by the test above, or both if it ran alone)."""
    work = tmp_path / "work"
    proc = sweep(team, "-S", "train.lr=0.061,0.062", "evaluate", "--workdir", str(work))
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if ": stage finetune" in line:
            time.sleep(1)
            exposed = [(ip, port, process.name()) for ip, port, process in listening(proc.pid) if not loopback(ip)]
            # Its own processes, not the machine's: another test (serve's) may start a Ray meanwhile.
            ours = psutil.Process(proc.pid).children(recursive=True)
            names = {p.name() for p in ours}
            stopped = time.monotonic()
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stdout.read().splitlines()
    code = proc.wait(120)
    _, left = psutil.wait_procs(ours, timeout=10)
    out = "\n".join(lines)
    assert re.search(rf"^ray: 1 node, {os.cpu_count()} CPUs", out, re.M), out  # not `cluster` (1 CPU a node)
    assert {"raylet", "gcs_server", "dvc"} <= names, names
    assert exposed == [], exposed  # the sweep's Ray (GCS, raylet, agents, workers) on loopback only
    assert code == 130, out
    assert time.monotonic() - stopped < driver.CANCEL_WAIT_S, out  # each stopped when told, none force-cancelled
    assert not left, f"processes outlived the sweep: {left}"
    assert "interrupted: stopping 2 experiments" in out
    assert out.splitlines()[-1].startswith("reprotune: sweep interrupted: 0 of 2 experiments finished"), out
    assert leftovers(work) == []
    assert not {"lr0.061", "lr0.062"} & set(remote_experiments(team))
