"""Process group set-up from torchrun's environment: nccl on GPUs, gloo on CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class DeviceError(RuntimeError):
    """The device a run asks for is not there (or is not a device fastrsb runs on)."""


def resolve_device(device: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """'auto' -> cuda:local_rank when a GPU is present, else cpu. 'cuda' gets the local rank.
    `setting` names the option the value came from, for the error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{setting}=cuda, but torch sees no GPU here (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); use {setting}=cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"{setting}=cuda: local rank {local_rank} needs GPU {local_rank}, "
                              f"this machine has {torch.cuda.device_count()}")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise DeviceError(f"{setting}: expected auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def _restart_safe_store(rank: int, world: int) -> dict:
    """Under torchrun, a key space of this restart attempt's own in the rendezvous store.

    torchrun's agent keeps one TCPStore for the whole job, across the restarts of --max-restarts, while
    init_process_group's env:// store adds no per-attempt prefix: a restarted group can read the previous
    attempt's keys (gloo: the dead processes' addresses), fail with "Connection refused" or hang.
    Returns init_process_group's store/rank/world_size arguments, or none outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    from torch.distributed.constants import default_pg_timeout

    # the agent serves the store when it says so; otherwise rank 0 hosts it (torch's own rule)
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=hosts,
                           timeout=default_pg_timeout)
    return {"store": tdist.PrefixStore(f"fastrsb/attempt_{attempt}", store), "rank": rank, "world_size": world}


def init_distributed(device: str = "auto", setting: str = "train.device") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun) and initialise the process group once."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dev = resolve_device(device, local_rank, setting)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                                 **_restart_safe_store(rank, world))
    return DistInfo(rank, world, local_rank, local_world, dev)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
