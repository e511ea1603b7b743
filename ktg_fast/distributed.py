"""Data-parallel training of one graph over processes started by ``torchrun`` (torch.distributed).

Every rank holds every node and trains on its slice of each global batch (the
loaders shard the single-process plan: :func:`ktg_fast.data.plan.shard_plan`).
A node's loss is a mean over the global batch's labelled rows, so rank ``r``
weighs its local mean by ``n_r / N`` (its labelled rows over the all-reduced
count) and the gradients are summed over the ranks: uneven slices and
``ignore_index`` rows weigh exactly as in one process.  Evaluation counts are
summed the same way.  Rank 0 alone writes files.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous;
:func:`init_from_env` joins the group (gloo on the CPU, NCCL on CUDA).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_from_env", "world_from_env", "RankLostError", "distributed_step_kind", "raised_by_main",
           "launcher_rank"]

log = logging.getLogger("ktg_fast")


class RankLostError(RuntimeError):
    """A collective failed: another rank died or stopped; the message names this rank and how to resume."""


def launcher_rank() -> int:
    """This process's global rank as torchrun sets it in the environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) if os.environ.get("WORLD_SIZE", "1") != "1" else 0


def world_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not started by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start several processes "
                         "with torchrun --nproc-per-node N") from None


@dataclass
class DistContext:
    """This process's place in a data-parallel run.

    Attributes:
        rank, world, local_rank: as torchrun numbers them.
        device: this rank's device (``cuda:<local_rank>`` on CUDA).
        sync_bn: trainable nodes' BatchNorm normalises with the global batch's statistics.
        ignore_index: the label value left out of every loss (as the graph loss's).
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    sync_bn: bool = False
    ignore_index: int = -100

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ collectives
    def _run(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:  # gloo: connection closed; NCCL: a watchdog error
            raise RankLostError(
                f"rank {self.rank} of {self.world}: {what} failed ({(str(e).strip().splitlines() or [''])[0]}); another rank "
                "stopped (torchrun's summary names it). Run the same command again with --resume to continue "
                "from the last checkpoint, with any number of processes") from None

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        self._run("an all-reduce", dist.all_reduce, t)
        return t

    def batch_weight(self, y: torch.Tensor) -> torch.Tensor:
        """``n_r / N``: this rank's labelled rows over the global batch's (0-dim, float64, on y's device)."""
        n = (y != self.ignore_index).sum().to(torch.float64).reshape(1)
        total = self.all_reduce_(n.clone())
        return (n / total.clamp_min(1)).reshape(())

    def sync_grads(self, grads: Iterable[Optional[torch.Tensor]]) -> None:
        """Sum gradients over the ranks (one collective per dtype; a flat buffer stays one tensor)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append(g)
        for ts in by_dtype.values():
            if len(ts) == 1:
                self.all_reduce_(ts[0])
                continue
            flat = torch.cat([t.reshape(-1) for t in ts])
            self.all_reduce_(flat)
            off = 0
            for t in ts:
                t.copy_(flat[off:off + t.numel()].view_as(t))
                off += t.numel()

    def start_sum(self, t: torch.Tensor) -> Any:
        """Start summing ``t`` over the ranks in place, without waiting; ``.wait()`` the handle returned."""
        return self._run("an all-reduce", dist.all_reduce, t, async_op=True)

    def wait(self, handles: list) -> None:
        """Wait for the sums :meth:`start_sum` started."""
        for h in handles:
            self._run("an all-reduce", h.wait)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (checkpoints: only rank 0 needs to read the file)."""
        box = [obj if self.is_main else None]
        self._run("a broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def raise_main_error(self, err: BaseException) -> None:
        """Raise ``err``, rank 0's error received by :meth:`broadcast_object`, marked as rank 0's: the command
        line prints it once, from rank 0 (see :func:`raised_by_main`)."""
        if not self.is_main:
            setattr(err, _FROM_MAIN, True)
        raise err

    def barrier(self) -> None:
        self._run("a barrier", dist.barrier)


_FROM_MAIN = "ktg_raised_by_rank0"


def raised_by_main(err: BaseException) -> bool:
    """Whether ``err`` is rank 0's error re-raised on this rank (:meth:`DistContext.raise_main_error`)."""
    return bool(getattr(err, _FROM_MAIN, False))


def init_from_env(device: str = "auto", *, sync_bn: bool = False,
                  timeout_s: float = 600.0) -> Optional[DistContext]:
    """Join the process group torchrun set up; None when this is a single process (no torchrun).

    Args:
        device: the run's ``--device``: ``auto``/``cuda`` give rank r ``cuda:<local_rank>`` when CUDA
            is usable, else the CPU.
        sync_bn: ``--sync-bn``.
        timeout_s: how long a collective waits for a silent rank.

    Raises:
        ValueError: ``--device cuda:N`` with several processes (each rank takes its own GPU), or
            ``--sync-bn`` without several processes.
    """
    world = world_from_env()
    if world <= 1:
        if sync_bn:
            log.warning("--sync-bn has no effect in a single process (start several with torchrun)")
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} with {world} processes: each rank takes cuda:<LOCAL_RANK>; "
                         "pass --device cuda or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ValueError("--device cuda, but CUDA is not available on this machine")
    if use_cuda and local >= torch.cuda.device_count():
        raise ValueError(f"local rank {local} has no GPU of its own: this machine shows {torch.cuda.device_count()} "
                         f"CUDA device(s); start at most that many processes per machine (--nproc-per-node), or "
                         "train on the CPU with --device cpu")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world=world, local_rank=local, device=dev, sync_bn=sync_bn)


def distributed_step_kind(kind: str) -> str:
    """The step path of a data-parallel run: eager or fused (the compiled and CUDA-graph steps, and
    ``auto``, become fused: their collectives are not captured or compiled yet)."""
    if kind in ("eager", "fused"):
        return kind
    if kind != "auto" and launcher_rank() == 0:  # said once, not by every process
        log.warning("--step %s runs in one process only for now; several processes use the fused step", kind)
    return "fused"
