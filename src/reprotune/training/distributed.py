"""Data-parallel training across processes and machines: torch's DistributedDataParallel, launched by torchrun.

The finetune stage is one script for every scale. With `train.nproc` x `train.nnodes` = 1 it trains in
its own process. Above that it hands itself to torchrun (`launch`), which starts one copy per process;
each copy joins the process group (`process_group`) and learns its rank. Semantics, so a run with N
processes is the run with one, split N ways:

- `train.batch_size` is the global batch. Every rank draws the same seeded shuffle and augmentation
  for the whole global batch and trains on its 1/N slice of it, so the ranks' shards differ each
  epoch and together are exactly the one-process batch. DDP averages the gradients, so `train.lr`
  means what it means in one process: no LR scaling by N.
- What differs from one process: BatchNorm normalizes each rank's slice with that slice's statistics,
  unless `train.sync_bn` (CUDA only) computes them over the global batch.
- Rank 0 alone validates, checkpoints and writes logs and outputs; the other ranks' images still
  count in the throughput, since every step trains the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from reprotune.config import Params, TrainConfig
from reprotune.errors import Interrupted, ReprotuneError
from reprotune.training.device import select_device


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def part(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (all of it in one process)."""
        size = len(batch) // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to train: `model` itself in one process, DDP around it otherwise. DDP hooks only
        the parameters that train now, so wrap again whenever the frozen set changes."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def share(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), returned on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


ONE_PROCESS = Group()
LAUNCHER_PID = "REPROTUNE_LAUNCHER_PID"  # set by `launch` for its ranks: the process they must not outlive


def _under_torchrun() -> bool:
    """torchrun started this process (it sets RANK, WORLD_SIZE, LOCAL_RANK and this)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def needs_launch(cfg: TrainConfig, node_rank: int = 0) -> bool:
    """More than one process is asked for and this process was not started by torchrun."""
    if not 0 <= node_rank < cfg.nnodes:
        raise ReprotuneError(f"--node-rank {node_rank} is outside 0..{cfg.nnodes - 1} (train.nnodes={cfg.nnodes})")
    return cfg.world_size > 1 and not _under_torchrun()


def torchrun_args(cfg: TrainConfig, script: list[str], node_rank: int) -> list[str]:
    """torchrun's command line for `script` (its path and arguments) on node `node_rank`."""
    if cfg.nnodes == 1:
        rendezvous = ["--standalone"]  # one machine: torchrun picks a free port itself
    else:
        # Static rendezvous: node 0 (the one running `dvc repro`) hosts global rank 0, the rank that
        # writes the outputs. Dynamic (c10d) rendezvous would rank the nodes by host name instead.
        rendezvous = ["--nnodes", str(cfg.nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
                      "--rdzv-endpoint", cfg.rdzv_endpoint]
    return [*rendezvous, "--nproc-per-node", str(cfg.nproc), "--max-restarts", "0", *script]


def launch(cfg: TrainConfig, script: list[str], node_rank: int = 0) -> None:
    """Run `script` as `cfg.nproc` processes on this node through torchrun; wait for all of them.

    torchrun runs in this process, so a failed rank ends in one line here (the rank's own error line
    is printed above it by that rank) rather than in torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = torchrun_args(cfg, script, node_rank)
    print("$ torchrun " + shlex.join(args), flush=True)
    # torchrun would give each process one thread; share this machine's cores among them instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # torchrun's agent runs in this process
    if os.environ.get("REPROTUNE_DEBUG") != "1":  # --debug keeps torchrun's own progress and warnings
        for name in list(logging.root.manager.loggerDict):  # torch gives each module's logger its own level
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode in (130, -2):  # Ctrl-C reached the ranks
            raise Interrupted("training stopped; run the stage again to resume from the last complete epoch") \
                from None
        raise ReprotuneError(f"training process rank {rank} of {cfg.world_size} failed with exit code "
                             f"{failure.exitcode} (its error is above)") from None
    except SignalException as exc:
        raise Interrupted(f"training stopped by signal {exc.sigval.name}; run the stage again to resume "
                          "from the last complete epoch") from None


@contextlib.contextmanager
def process_group(params: Params) -> Iterator[Group]:
    """Join the training processes torchrun started (a one-process Group when there are none)."""
    cfg = params.train
    if not _under_torchrun():
        yield ONE_PROCESS
        return
    group = Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if group.world != cfg.world_size:
        raise ReprotuneError(f"torchrun started {group.world} processes but train.nproc x train.nnodes = "
                             f"{cfg.world_size}: set them to match (they are recorded with the run)")
    _die_with_launcher()
    try:
        device = select_device(cfg.device, group.local_rank)
    except ReprotuneError as exc:
        raise params.error(str(exc)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield group
    finally:
        dist.destroy_process_group()


def _die_with_launcher() -> None:
    """Make the kernel kill this rank when its torchrun launcher dies.

    torchrun starts each rank in its own session, so a launcher killed outright (SIGKILL, the OOM
    killer, a CI timeout) would leave its ranks training on, unseen, until rank 0 wrote outputs nobody
    asked for, racing the rerun in the same checkpoint directory. Linux only (prctl); elsewhere a
    killed launcher's ranks stop at their next collective call, when their peers are gone.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is not None and os.getppid() != int(launcher):  # it died before prctl took effect
        raise ReprotuneError("the torchrun launcher exited before this training process started")


def script_path(file: str) -> str:
    """A stage script's path as torchrun should run it: relative to the working directory if inside it."""
    path = Path(file).resolve()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)
