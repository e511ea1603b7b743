"""One process of the data-parallel step benchmark (``bench/test_bench_distributed.py``).

    python bench/dist_step.py --models resnet8 resnet8 resnet8 --batch 32 --steps 10
    torchrun --nproc-per-node 2 bench/dist_step.py --models resnet8 resnet8 resnet8 --batch 32 --steps 10

Trains the graph (every edge ``through``) with the fused (or ``--step eager``, or eager nets in
DistributedDataParallel: ``--ddp``) step at the global batch ``--batch``, each process on its slice, and times (medians, after warm-up) the whole step and, separately, the gradient
sum over the processes alone (the same collectives on the same flat buffers).  Rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ktg_fast.data.plan import shard_bounds
from ktg_fast.distributed import init_from_env
from ktg_fast.graph import Graph, Node
from ktg_fast.models import get_model
from ktg_fast.recipe import TrainConfig
from ktg_fast.steps import make_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet8"] * 3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--step", choices=("fused", "eager"), default="fused")
    p.add_argument("--sum-mb", type=float, nargs="*", default=[],
                   help="also time the gradient sum of buffers of these sizes (MB; the paper's graphs)")
    p.add_argument("--ddp", action="store_true", help="eager nets wrapped in DistributedDataParallel (its bucketed, "
                                                      "overlapped all-reduce) instead of the step's gradient sum")
    a = p.parse_args()
    dist = init_from_env("cpu")
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world)
    n = len(a.models)
    gates = [["through" if t > 0 and s != t else "cutoff" for t in range(n + 1)] for s in range(n + 1)]
    graph = Graph([Node(m) for m in a.models], gates)
    torch.manual_seed(0)
    nets = [get_model(m, num_classes=a.classes) for m in a.models]
    if a.ddp and dist is not None:  # (timing only: DDP averages where the step sums; the work is the same)
        nets = [torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False) for net in nets]
    step = make_step("eager" if a.ddp else a.step, graph, nets, TrainConfig(batch_size=a.batch))
    step.dist = None if a.ddp else dist
    lo, hi = shard_bounds(a.batch, rank, world)
    x = torch.randn(a.batch, 3, 32, 32)[lo:hi]
    y = torch.randint(0, a.classes, (a.batch,))[lo:hi]
    prog = torch.tensor(0.5)
    times, syncs = [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        step(x, y, prog)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    if a.step == "fused" and not a.ddp:
        flats = [f.grad for g in step.train_groups for f in g.flats]
    else:
        flats = [p.grad for net in nets for p in net.parameters() if p.grad is not None]
    if dist is not None and not a.ddp:
        for i in range(a.warmup + a.steps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.sync_grads(flats)
            if i >= a.warmup:
                syncs.append(time.perf_counter() - t0)
    sums = {}
    for mb in a.sum_mb if dist is not None else []:
        buf = torch.zeros(int(mb * 2**20) // 4)
        ts = []
        for i in range(a.warmup + a.steps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.sync_grads([buf])
            if i >= a.warmup:
                ts.append(time.perf_counter() - t0)
        sums[str(mb)] = 1e3 * statistics.median(ts)
    if rank == 0:
        print(json.dumps({"sum_ms_by_mb": sums, "world": world, "models": a.models, "step": a.step, "ddp": a.ddp, "batch": a.batch, "threads": torch.get_num_threads(),
                          "step_ms": 1e3 * statistics.median(times),
                          "sync_ms": 1e3 * statistics.median(syncs) if syncs else 0.0,
                          "grad_bytes": sum(f.numel() * f.element_size() for f in flats),
                          "collectives": None if a.ddp else len(flats) if a.step == "fused" else
                          len({f.dtype for f in flats})}), flush=True)
    if dist is not None:
        dist.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
