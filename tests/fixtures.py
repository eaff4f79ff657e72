"""What the tests share, in one place: the repository, running commands, tiny projects, synthetic data,
normalization constants, reading TensorBoard logs, and the check that keeps the tier markers true.

A plain module (`from fixtures import run, synthetic_splits`): test files import it, never each other
or conftest.py, which holds the pytest fixtures and hooks built on it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from reprotune.data.splits import Split, make_splits
from reprotune.data.synthetic import synthetic_raw

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore", ".gitignore",
                 "data/incoming/README.md"]

# A pipeline small enough to run in seconds on 2 CPU cores, through exactly the real code path.
TINY = {
    "data.dataset": "synthetic",
    "data.synthetic_train": 640,
    "data.synthetic_test": 200,
    "model.weights": "none",
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.lr": 0.05,
    "log.images": 8,
    "export.check_images": 16,
    "export.calibration_images": 64,
    "export.int8_min_agreement": 0.5,  # a 2-epoch model has small margins for int8 to keep
    "export.latency_runs": 5,
    # The same run on every host: CUDA's path is what the `gpu`-marked tests (make gpu-check) take.
    "train.device": "cpu",
}
# The stages that stop early in the TINY pipeline: compress (compress.ratio 0) and monitor (no images
# in data/incoming/).
IDLE = ("compress", "monitor")

# Per-channel normalization for models and splits built by hand (a model only needs some mean and std).
MEAN, STD = [0.5] * 3, [0.25] * 3


def synthetic_splits(n_train: int, n_test: int, val_fraction: float, seed: int = 0) -> dict[str, Split]:
    """Train/val/test splits of the synthetic classes, as the preprocess stage makes them: `n_train`
    training images of which `val_fraction` of each class is held out for validation, and `n_test` test
    images (`data.synthetic.synthetic_raw`, seeded with `seed`, which also seeds the split)."""
    return make_splits(synthetic_raw(n_train, n_test, seed), val_fraction, seed)


def events(logdir: Path):
    """A TensorBoard log directory read back in full with TensorBoard's own reader (an EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------------------------------ the tiers

# What a test may need beyond this process and its temporary files; each is a marker (pyproject.toml)
# that `make test-fast` deselects. conftest.py marks the users of its `pipeline` and `exported`
# fixtures `dvc`; `require` fails a test that starts one of these without its marker, so a new test
# cannot slip into the fast tier unmarked.
TIERS = ("dvc", "ray", "torchrun", "gpu")
current_test: pytest.Item | None = None  # set by conftest.py before each test's setup


def require(marker: str, what: str) -> None:
    """Fail the running test unless it carries `marker` (it is about to do `what`)."""
    if current_test is not None and current_test.get_closest_marker(marker) is None:
        pytest.fail(f"{current_test.nodeid} {what} but is not marked `{marker}`: add `@pytest.mark.{marker}` "
                    "(or to the module's `pytestmark`) so that `make test-fast` leaves it out", pytrace=False)


# ------------------------------------------------------------------------------------- commands

def env() -> dict[str, str]:
    """The environment stages and DVC run in: this venv first on PATH, git identity, no debug."""
    environ = {k: v for k, v in os.environ.items() if k != "REPROTUNE_DEBUG"}
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    for role in ("AUTHOR", "COMMITTER"):
        environ[f"GIT_{role}_NAME"] = "reprotune tests"
        environ[f"GIT_{role}_EMAIL"] = "tests@reprotune.invalid"
    return environ


def run(args: list[str], cwd: Path, check: bool = True, timeout: float = 600,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in `cwd`; on an unexpected exit code, fail with its output."""
    program = Path(str(args[0])).name
    if program == "dvc" or (program == "reprotune" and args[1:2] == ["demo"]):
        require("dvc", f"runs `{' '.join(map(str, [program, *args[1:2]]))}`")
    proc = subprocess.run(args, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def listening(pid: int) -> list[tuple[str, int, psutil.Process]]:
    """The sockets a process and its descendants listen on: (address, port, process)."""
    tree = psutil.Process(pid)
    processes = {p.pid: p for p in (tree, *tree.children(recursive=True))}
    return [(c.laddr.ip, c.laddr.port, processes[c.pid]) for c in psutil.net_connections("inet")
            if c.pid in processes and c.status == psutil.CONN_LISTEN]


def loopback(ip: str) -> bool:
    """Whether a listening address is this machine's loopback (::ffff:127.0.0.1 included)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------- projects

def set_params(path: Path, overrides: dict) -> None:
    """Apply dotted-key overrides to a params file."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC project holding the pipeline, with `overrides` applied and committed."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dest = REPO / name, root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest)
    set_params(root / "params.yaml", {**TINY, **(overrides or {})})
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "tiny pipeline"], root)
    return root


# Smaller than TINY: an experiment of the team project is a 1-epoch finetune + evaluate, ~13 s on a core.
TEAM = {"data.synthetic_train": 320, "data.synthetic_test": 100, "train.epochs": 1}


def team_project(top: Path) -> Path:
    """A user's clone of a team project under `top` (TINY, then TEAM): its git remote a bare
    repository (`origin.git`), its DVC remote a directory (`dvcstore`, given relatively, as people
    write it), the baseline reproduced up to evaluate and pushed to both. For `reprotune sweep`
    (tests/test_sweep.py and bench/sweep.py)."""
    root = make_project(top / "user", TEAM)
    run(["git", "init", "-q", "--bare", "-b", "main", str(top / "origin.git")], top)
    run(["git", "remote", "add", "origin", "../origin.git"], root)
    run(["dvc", "remote", "add", "-d", "shared", "../dvcstore"], root)
    run(["dvc", "repro", "evaluate"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline"], root)
    run(["git", "push", "-q", "origin", "main"], root)
    run(["dvc", "push", "-q"], root)
    return root


# ------------------------------------------------------------------------------------- Ray clusters

# Two Ray nodes on this machine, each its own raylet and object store, joined in one cluster: Ray's own
# tool for a multi-node cluster on one host. (`ray start` for the second node would swap its loopback
# address for the machine's network address; see reprotune.inference.cluster.) A line `kill NODE_ID`
# on its stdin kills that node outright (its raylet and workers SIGKILLed, as a lost machine); the GCS
# checks nodes every second and gives one up after 3 missed checks, so a test sees it die quickly. The
# cluster shuts down when its stdin closes.
TWO_NODES = """
import sys
from reprotune.inference.cluster import ray_environment
ray_environment("127.0.0.1:0")
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1",
    "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
nodes = [cluster.head_node, cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")]
cluster.wait_for_nodes()
print(cluster.address, *(node.node_id for node in nodes), flush=True)
for line in sys.stdin:
    if line.startswith("kill "):
        node = next(n for n in nodes if n.node_id.startswith(line.split()[1]))
        cluster.remove_node(node, allow_graceful=False)
        print("killed", node.node_id, flush=True)
cluster.shutdown()
"""


@contextlib.contextmanager
def two_node_cluster(cwd: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, list[str], object]]:
    """A two-node loopback Ray cluster (1 CPU each) for the test's length: yields its address, the
    two node ids (head first) and `kill(node_id_prefix)`, which kills that node outright."""
    require("ray", "starts a Ray cluster")
    cluster = subprocess.Popen([sys.executable, "-c", TWO_NODES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**env(), **(extra_env or {})}, cwd=cwd)

    def kill(node: str) -> None:
        cluster.stdin.write(f"kill {node}\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().startswith("killed "), "the node was not killed"

    try:
        address, *nodes = cluster.stdout.readline().split()
        assert address.startswith("127.0.0.1:"), f"the cluster did not start (exit {cluster.poll()})"
        yield address, nodes, kill
    finally:
        with contextlib.suppress(BrokenPipeError):
            cluster.stdin.close()
        assert cluster.wait(120) == 0
