"""Joining the process group that torchrun describes, and failing together.

A command started by torchrun (RANK and WORLD_SIZE in the environment, WORLD_SIZE > 1) joins the
default process group before it does anything else: gloo for CPU tensors and, where CUDA is present,
NCCL for CUDA tensors (one group serves both: "cpu:gloo,cuda:nccl"). Each process takes the CUDA device
of its LOCAL_RANK. Commands declare whether they run distributed (`set_defaults(distributed=True)`);
the others refuse a multi-process launch before any work.

When a peer dies, torch.distributed raises on the survivors (gloo: the connection closes; NCCL: the
watchdog times out). `PeerLost` turns that into one clear message on every surviving rank. Gloo raises
a plain RuntimeError ("Connection reset by peer", "Connection closed by peer") from send/recv and
collectives, not a DistError: communication calls made through `communicate` re-raise it as a
DistNetworkError, which the command line turns into PeerLost.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slm_fast.errors import SlmFastError

TIMEOUT_ENV = "SLM_FAST_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800  # one block of a 405B model on a slow disk stays well inside this


class PeerLost(SlmFastError):
    """Another rank of the run stopped (died, was killed, or lost the network)."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints the summary and writes outputs."""
        return self.rank == 0


def from_environment() -> Launch:
    """The launch torchrun describes in the environment (a single process when it does not)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Launch()
    return Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def join(launch: Launch) -> None:
    """Join the default process group of `launch` (nothing for a single process)."""
    if not launch.distributed or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def communicate(call, *args, **kwargs):
    """`call(*args, **kwargs)`, a torch.distributed call, with a RuntimeError it raises (gloo's lost
    connections) re-raised as DistNetworkError."""
    try:
        return call(*args, **kwargs)
    except dist.DistError:
        raise
    except RuntimeError as exc:
        raise dist.DistNetworkError(str(exc)) from exc


def peer_lost(launch: Launch, error: BaseException) -> PeerLost:
    """The clear error for a failed collective or send/recv: which rank saw it, and what to do."""
    return PeerLost(
        f"rank {launch.rank} of {launch.world_size} lost contact with the other ranks ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no message'}): a rank died, was stopped, or the "
        "network failed; see the first failing rank's output, then rerun the torchrun command (prune: add --resume)"
    )
