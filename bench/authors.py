"""The authors' style, the baseline every benchmark compares with (one home for it).

What the paper's code does, per target node: a loss module per edge (per-sample KL at temperature T
against the detached source, or cross-entropy with the label), the gate applied to the per-sample
losses afterwards, the batch mean over the rows that count, one backward per node
(``retain_graph``), one ``torch.optim.SGD`` per node.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ktg_fast.gates import CORRECT, CUTOFF, LINEAR, THROUGH, gate_codes
from ktg_fast.graph import Graph
from ktg_fast.recipe import TrainConfig

__all__ = ["KLEdge", "LabelEdge", "node_loss", "loss_step", "AuthorsStep"]


class KLEdge(nn.Module):
    """Per-sample T^2 * KL(p_source || p_target), source detached."""

    def __init__(self, temperature: float):
        super().__init__()
        self.t = temperature

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(target / self.t, dim=-1)
        p = F.softmax(source.detach() / self.t, dim=-1)
        return self.t * self.t * F.kl_div(log_q, p, reduction="none").sum(-1)


class LabelEdge(nn.Module):
    """Per-sample cross-entropy with the label (ignored rows give 0)."""

    def forward(self, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(target, labels, reduction="none", ignore_index=-100)


def node_loss(outs: Sequence[torch.Tensor], labels: torch.Tensor, codes: Sequence[Sequence[int]], t: int,
              temperature: float, progress: torch.Tensor) -> torch.Tensor:
    """Target ``t``'s loss (1-based), edge by edge: per-sample loss, gate weight, mean over counted rows."""
    valid = labels != -100
    n_valid = valid.sum().clamp(min=1)
    zt = outs[t - 1].float()
    loss = zt.new_zeros(())
    for s in range(len(outs) + 1):
        gate = codes[s][t]
        if s == t or gate == CUTOFF:
            continue
        if s == 0:
            per_sample, correct = LabelEdge()(zt, labels), torch.ones_like(valid)
        else:
            zs = outs[s - 1].float()
            per_sample, correct = KLEdge(temperature)(zt, zs), zs.argmax(-1) == labels
        w = {THROUGH: torch.ones_like(per_sample), LINEAR: progress.expand_as(per_sample),
             CORRECT: correct.to(per_sample.dtype)}[gate]
        loss = loss + (per_sample * w * valid).sum() / n_valid
    return loss


def loss_step(z: torch.Tensor, labels: torch.Tensor, codes: Sequence[Sequence[int]], temperature: float,
              progress: torch.Tensor) -> None:
    """The loss part alone (bench/test_bench_loss.py): every node's loss, one backward per node."""
    outs = list(z.unbind(0))
    m = len(outs)
    for t in range(1, m + 1):
        loss = node_loss(outs, labels, codes, t, temperature, progress)
        if loss.requires_grad:
            loss.backward(retain_graph=t < m)


class AuthorsStep:
    """A whole training step in the authors' style (bench/test_bench_step.py).

    Args:
        graph, nets, cfg: the graph, one net per node, the recipe.
        precision: "fp32", or "bf16"/"fp16" for the nets' forward under ``torch.autocast`` (the losses
            in float32, as a user adding autocast to this loop would get; no loss scaling).
        compile: what a user of ``torch.compile`` would do to this loop: ``torch.compile`` each net and
            the per-node loss function (the per-node backward and the ``torch.optim.SGD`` steps stay as
            they are: a ``backward`` is a graph break anyway).
    """

    kind = "authors"

    def __init__(self, graph: Graph, nets: list[nn.Module], cfg: TrainConfig, *, precision: str = "fp32",
                 compile: bool = False):
        self.graph, self.nets = graph, nets
        self.codes = gate_codes(graph.gates).tolist()
        self.opts = {t: torch.optim.SGD(nets[t - 1].parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
                     for t in graph.trainable}
        for net in nets:
            net.train()
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.forwards = [torch.compile(net) for net in nets] if compile else list(nets)
        self.node_loss = torch.compile(node_loss) if compile else node_loss
        if compile:
            self.kind = "authors_compiled"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: torch.Tensor):
        if self.dtype is None:
            outs = [f(x) for f in self.forwards]
        else:
            with torch.autocast(x.device.type, dtype=self.dtype):
                outs = [f(x) for f in self.forwards]
        losses = []
        for t, opt in self.opts.items():
            loss = self.node_loss(outs, y, self.codes, t, self.graph.temperature, progress)
            opt.zero_grad()
            loss.backward(retain_graph=True)
            losses.append(loss.detach())
        for opt in self.opts.values():
            opt.step()
        return torch.stack(losses), torch.stack(outs).detach()
