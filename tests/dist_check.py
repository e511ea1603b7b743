"""Data-parallel steps against one process, in float64 (run by tests/test_distributed.py).

    python tests/dist_check.py OUT                               # the one-process oracle
    torchrun --nproc-per-node 2 tests/dist_check.py OUT          # the same cases over 2 ranks

Cases (each 3 steps at global batch 32, a different seeded batch per step):
- ``{eager,fused}-sync``: two resnet8 (one vmapped group), one wrn10_1, a frozen resnet8 teacher and a
  linear gate, with ``--sync-bn`` semantics (BatchNorm over the global batch);
- ``{eager,fused}-ignore``: the same with ``ignore_index`` rows spread unevenly (5 on rank 0, 1 on rank 1);
- ``{eager,fused}-plain``: a BatchNorm-free net, ranks normalising nothing (no --sync-bn needed);
- ``fused-nosync``: the BatchNorm nets without --sync-bn (each rank its own statistics: must differ);
- ``fused-sync32``: ``fused-sync`` in float32 (initialised and fed in float32); the one-process run also
  writes ``fused-sync32-exact``, the same run in float64.
Rank 0 saves every node's state dict and momentum per case to ``OUT/<case>.pt``, and
``OUT/eval.pt``: accuracies and the image count of an odd-sized (37) evaluation set, sharded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from ktg_fast.data.dataset import ArrayDataset
from ktg_fast.data.loader import BatchLoader
from ktg_fast.data.plan import shard_bounds
from ktg_fast.distributed import init_from_env
from ktg_fast.epoch_stats import evaluate_nodes
from ktg_fast.graph import Graph, Node
from ktg_fast.models import get_model
from ktg_fast.nodes import save_model_checkpoint
from ktg_fast.recipe import TrainConfig
from ktg_fast.steps import make_step
from ktg_fast.sync_bn import convert_sync_batchnorm

B, C = 32, 10


class Plain(nn.Module):
    """A BatchNorm-free net (conv, ReLU, pooling, linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def graph(teacher: Path, models: list[str]) -> Graph:
    # node 4 is a frozen teacher; node 1 learns from node 2 through a linear gate.
    g = [["cutoff", "through", "through", "through", "cutoff"],
         ["cutoff", "cutoff", "through", "correct", "cutoff"],
         ["cutoff", "linear", "cutoff", "through", "cutoff"],
         ["cutoff", "through", "through", "cutoff", "cutoff"],
         ["cutoff", "through", "cutoff", "linear", "cutoff"]]
    return Graph([Node(m) for m in models[:3]] + [Node(models[3], checkpoint=str(teacher))], g, check_models=False)


def nets_for(case: str, teacher: Path, dist) -> tuple[Graph, list[nn.Module]]:
    torch.manual_seed(1)
    if case.endswith("plain"):
        nets = [Plain() for _ in range(4)]
        g = graph(teacher, ["resnet8", "resnet8", "resnet8", "resnet8"])
    else:
        nets = [get_model(m, num_classes=C) for m in ("resnet8", "resnet8", "wrn10_1", "resnet8")]
        for net in nets:  # BatchNorm affine parameters away from (1, 0), so their gradients matter
            for mod in net.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.data.uniform_(0.5, 1.5)
                    mod.bias.data.uniform_(-0.5, 0.5)
        g = graph(teacher, ["resnet8", "resnet8", "wrn10_1", "resnet8"])
        if dist is not None and not case.endswith("nosync"):  # --sync-bn; the oracle keeps torch's BatchNorm
            for t in g.trainable:
                convert_sync_batchnorm(nets[t - 1])
    nets[3].eval().requires_grad_(False)
    return g, nets


def batch(step: int, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 3, 32, 32, generator=gen)
    y = torch.randint(0, C, (B,), generator=gen)
    if case.endswith("ignore"):
        y[[0, 1, 2, 3, 4, 20]] = -100  # 5 rows in rank 0's half, 1 in rank 1's
    return x, y


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dist = init_from_env("cpu", sync_bn=True)
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world)
    torch.set_default_dtype(torch.float64)
    teacher = out / f"teacher{rank}.pt"
    torch.manual_seed(123)
    save_model_checkpoint(teacher, get_model("resnet8", num_classes=C), name="resnet8", num_classes=C, in_channels=3)
    lo, hi = shard_bounds(B, rank, world)
    for kind in ("eager", "fused"):
        for variant in ("sync", "ignore", "plain") + (("nosync",) if kind == "fused" else ()):
            case = f"{kind}-{variant}"
            g, nets = nets_for(case, teacher, dist)
            st = make_step(kind, g, nets, TrainConfig(lr=0.05, batch_size=B), loss_impl="reference")
            st.dist = dist
            for k in range(3):
                x, y = batch(k, case)
                st(x[lo:hi], y[lo:hi], torch.tensor(k / 3))
            if rank == 0:
                torch.save({"nets": st.node_state_dicts(), "momentum": st.momentum_buffers()}, out / f"{case}.pt")
    # float32 with --sync-bn, the same float32 initialisation and batches; the one-process run also saves the
    # float64 answer of that very run: the data-parallel float32 run must be no farther from it than one process.
    for name, dtype in (("fused-sync32", torch.float32),) + ((("fused-sync32-exact", torch.float64),)
                                                             if dist is None else ()):
        torch.set_default_dtype(torch.float32)
        g, nets = nets_for("fused-sync", teacher, dist)
        nets = [net.to(dtype) for net in nets]
        st = make_step("fused", g, nets, TrainConfig(lr=0.05, batch_size=B), loss_impl="reference")
        st.dist = dist
        for k in range(3):
            x, y = batch(k, "fused-sync")
            st(x[lo:hi].to(dtype), y[lo:hi], torch.tensor(k / 3, dtype=dtype))
        if rank == 0:
            torch.save({"nets": st.node_state_dicts(), "momentum": st.momentum_buffers()}, out / f"{name}.pt")
    # Evaluation of 37 images over the ranks: each image once (float32, as loaders deliver).
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(2)
    g = graph(teacher, ["resnet8"] * 4)
    st = make_step("fused", g, [Plain() for _ in range(4)], TrainConfig(batch_size=B), loss_impl="reference")
    gen = torch.Generator().manual_seed(5)
    ds = ArrayDataset(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=gen),
                      torch.randint(0, C, (37,), generator=gen), C, "synthetic")
    loader = BatchLoader(ds, 8, train=False, seed=0, augment=False)
    loader.set_shard(rank, world)
    mine = sum(int(y.shape[0]) for _, y in loader)
    count = torch.tensor([mine])
    if dist is not None:
        dist.all_reduce_(count)
    accs = evaluate_nodes(st, loader, 4, torch.device("cpu"), dist)
    if rank == 0:
        torch.save({"acc": accs, "count": int(count)}, out / "eval.pt")
    if dist is not None:  # leave together: a rank exiting alone may take gloo's peer down with an abort
        dist.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
