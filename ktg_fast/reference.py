"""The vectorised PyTorch graph loss: the oracle every fast path is tested against (docs/SEMANTICS.md).

:func:`graph_loss_reference` computes every edge at once (a loop over gate kinds, never over
edges); :func:`reference_with_grad` also gives the gradient in closed form, as the kernel does.
:class:`EdgePlan` is what a gate matrix asks for, derived once (``GraphLoss`` binds it).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from . import gates as _gates
from .loss_inputs import (GatesLike, GraphLossResult, LogitsLike, check_labels, check_temperature, flatten_batch,
                          prepare_gates, progress_tensor, stack_logits)

__all__ = ["EdgePlan", "edge_plan", "gate_weights", "graph_loss_reference", "reference_loss", "reference_with_grad",
           "cached_codes", "take"]


def graph_loss_reference(
    logits: LogitsLike,
    labels: torch.Tensor,
    gates: GatesLike,
    *,
    temperature: float = 1.0,
    progress: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
) -> GraphLossResult:
    """Vectorised PyTorch graph loss (SEMANTICS.md), all edges at once.

    Computes in float32, or float64 when the logits are float64; gradients
    flow to each target's logits only (sources are detached).  Rows whose
    label is ``ignore_index`` count nowhere; an all-ignored batch gives zero
    losses.  Targets whose inputs are all cutoff cost nothing.
    """
    z = stack_logits(logits)
    codes = prepare_gates(gates, z.shape[0])
    z, labels = flatten_batch(z, labels)
    check_labels(labels, z, ignore_index)
    t = check_temperature(temperature)
    return reference_loss(z, labels, edge_plan(codes), t, progress, ignore_index)


@dataclass(frozen=True)
class EdgePlan:
    """What a gate matrix asks the reference to compute; derived once per matrix (GraphLoss binds it)."""

    codes: torch.Tensor  # (M+1, M+1) int64 on the CPU
    key: tuple[tuple[int, ...], ...]  # the same as nested tuples (device copies are cached by it)
    kinds: tuple[int, ...]  # the non-cutoff gate codes present
    needs_correct: bool  # some gate other than cutoff, through, linear (it may read correctness)
    kl_targets: tuple[int, ...]  # 0-based nodes with a non-cutoff KL input (frozen nodes cost nothing)
    kl_sources: tuple[int, ...]  # 0-based nodes feeding those targets
    ce_targets: tuple[int, ...]  # 0-based nodes with a label edge
    kernel_ok: bool  # built-in gates only: the Triton kernel can run it

    @property
    def num_nodes(self) -> int:
        return self.codes.shape[0] - 1


def edge_plan(codes: torch.Tensor) -> EdgePlan:
    kinds = tuple(c for c in codes.unique().tolist() if c != _gates.CUTOFF)
    codes_kl = codes[1:, 1:]
    kl_targets = tuple((codes_kl != _gates.CUTOFF).any(dim=0).nonzero().flatten().tolist())
    kl_sources = tuple((codes_kl[:, list(kl_targets)] != _gates.CUTOFF).any(dim=1).nonzero().flatten().tolist()) \
        if kl_targets else ()
    ce_targets = tuple((codes[0, 1:] != _gates.CUTOFF).nonzero().flatten().tolist())
    return EdgePlan(codes, tuple(map(tuple, codes.tolist())), kinds, any(c not in (_gates.THROUGH, _gates.LINEAR) for c in kinds), kl_targets,
                     kl_sources, ce_targets, all(c in _gates.KERNEL_GATES for c in kinds))


def gate_weights(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, dtype: torch.dtype,
                  progress: Union[float, torch.Tensor], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample edge weights W[s, t, n] (gate weight / B_eff, 0 on ignored rows) and labels safe to gather."""
    m, b, _ = z.shape
    dev = z.device
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    n_valid = valid.sum().to(dtype)
    # An all-ignored batch yields zeros, not 0/0 = NaN.
    inv_b = valid.to(dtype) / n_valid.clamp(min=1.0)  # (B,) per-row weight 1/B_eff or 0
    prog = progress_tensor(progress, dev, dtype)
    correct = None
    if plan.needs_correct:
        # The label source (row 0) is always correct.
        correct = torch.cat(
            [torch.ones(1, b, dtype=torch.bool, device=dev), z.detach().argmax(dim=-1) == labels.unsqueeze(0)]
        )
    ctx = _gates.GateContext(source_logits=z.detach(), labels=labels, progress=prog, correct=correct)
    weights = torch.zeros(m + 1, m + 1, b, dtype=dtype, device=dev)
    codes_dev = cached_codes(plan.key, str(dev))  # cached: no host copy per step (CUDA-graph capturable)
    for code in plan.kinds:  # a loop over gate kinds (at most a handful), never over edges
        w = _gates.get_gate(code).weight(ctx)
        # A Python number becomes a device fill, not a host-to-device copy.
        w = torch.full((), float(w), dtype=dtype, device=dev) if not isinstance(w, torch.Tensor) else w.to(dev, dtype)
        w = torch.broadcast_to(w, (m + 1, b))
        weights = torch.where((codes_dev == code).unsqueeze(-1), w.unsqueeze(1), weights)
    return weights * inv_b, safe_labels  # the batch mean and the ignore mask folded into the weights


def reference_loss(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, t: float,
               progress: Union[float, torch.Tensor], ignore_index: int) -> GraphLossResult:
    """The reference on validated inputs (see :func:`graph_loss_reference`)."""
    m, b, c = z.shape
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    dev = z.device
    zf = z.to(dtype)
    labels = labels.to(dev)
    weights, safe_labels = gate_weights(z, labels, plan, dtype, progress, ignore_index)

    edge = torch.zeros(m + 1, m + 1, dtype=dtype, device=dev)
    # Only targets with some non-cutoff KL input are computed: frozen nodes cost nothing.
    kl_targets, kl_sources = list(plan.kl_targets), list(plan.kl_sources)
    if kl_targets:
        # One log-softmax over every node that takes part (sources and targets share it; a contiguous
        # run of nodes is a view, not a copy).  Masked classes (logit -inf) are clamped to the most
        # negative float first: their p is exactly 0 and p log p = 0 (0 * log 0 = 0) with no NaN,
        # while p_s > 0 against a masked target class still makes a huge KL.
        used = sorted(set(kl_sources) | set(kl_targets))
        z_used = take(zf, used)
        if t != 1.0:
            z_used = z_used / t
        # On the CPU a finite batch (the usual case) skips the guards below: checking costs one sum,
        # the guards three passes (forward and backward).  On devices, and when traced, they always run
        # (no synchronisation, no data-dependent branch).
        guard = True
        if z_used.device.type == "cpu" and not torch.compiler.is_compiling():
            guard = not math.isfinite(float(z_used.detach().sum()))  # any NaN or inf makes the sum one
        logp = torch.log_softmax(z_used.clamp(min=torch.finfo(dtype).min) if guard else z_used, dim=-1)
        pos = {node: k for k, node in enumerate(used)}
        logp_s = take(logp, [pos[n] for n in kl_sources]).detach()
        logp_t = take(logp, [pos[n] for n in kl_targets])
        p_s = logp_s.exp()
        neg_entropy = (p_s * logp_s).sum(-1)  # (S, B): sum_c p_s log p_s
        # The pairwise product also carries every target's gradient (sum_s w_st p_s): a source holding
        # NaN/inf must not reach targets it has only cutoff edges to (0 * NaN), so the product sees
        # finite probabilities; such a source's live edges still get a NaN loss through neg_entropy.
        p_fin = torch.nan_to_num(p_s, nan=0.0, posinf=0.0, neginf=0.0) if guard else p_s
        cross = torch.einsum("sbc,tbc->stb", p_fin, logp_t)  # sum_c p_s log p_t for every pair
        per_sample = (t * t) * (neg_entropy.unsqueeze(1) - cross)  # (S, T, B)
        w_kl = weights[1:, 1:][kl_sources][:, kl_targets]
        # where(), not w * l: a cutoff edge (or an ignored row) is exactly 0 whatever l holds.
        vals = torch.where(w_kl != 0, w_kl * per_sample, 0.0).sum(-1)
        si = _index_tensor(tuple(s + 1 for s in kl_sources), str(dev))
        ti = _index_tensor(tuple(t + 1 for t in kl_targets), str(dev))
        edge = edge.index_put((si.unsqueeze(1), ti.unsqueeze(0)), vals)

    ce_targets = list(plan.ce_targets)
    if ce_targets:
        zt = take(zf, ce_targets)
        n = len(ce_targets)
        # The fused log-softmax + NLL (a masked label class gives +inf, ignored rows 0).
        ce = torch.nn.functional.cross_entropy(zt.reshape(n * b, c), safe_labels.long().repeat(n),
                                               reduction="none").view(n, b)
        w_ce = weights[0, 1:][ce_targets]
        vals = torch.where(w_ce != 0, w_ce * ce, 0.0).sum(-1)
        edge = edge.index_put((_index_tensor((0,) * n, str(dev)),
                               _index_tensor(tuple(t + 1 for t in ce_targets), str(dev))), vals)

    return GraphLossResult(node_loss=edge[:, 1:].sum(0), edge_loss=edge)


def reference_with_grad(z: torch.Tensor, labels: torch.Tensor, plan: "EdgePlan", temperature: float,
                        progress: Union[float, torch.Tensor], ignore_index: int
                        ) -> tuple[GraphLossResult, torch.Tensor]:
    """The reference losses and, in closed form, grad (M, B, C) = d(sum of node losses)/d logits.

    What the Triton kernel computes in one pass, in plain PyTorch ops (no autograd): SEMANTICS.md's
    dL_t/dz_t = T (sum_s w_st p_t - sum_s w_st p_s) + w_0t (q_t - onehot(y)), weights over B_eff.
    Used where the gradient must come with the forward (chunked losses) on devices without the
    kernel; float32 (float64 for float64 logits).  Inputs must be validated (``GraphLoss`` does).
    """
    with torch.no_grad():
        res = reference_loss(z, labels, plan, temperature, progress, ignore_index)
        m, b, c = z.shape
        dtype = res.edge_loss.dtype
        zf = z.to(dtype)
        labels = labels.to(z.device)
        weights, safe_labels = gate_weights(z, labels, plan, dtype, progress, ignore_index)
        grad = torch.zeros(m, b, c, dtype=dtype, device=z.device)
        t = float(temperature)
        if plan.kl_targets:
            tg, src = list(plan.kl_targets), list(plan.kl_sources)
            w_kl = weights[1:, 1:][src][:, tg]  # (S, T, B)
            p_s = torch.nan_to_num(torch.softmax(zf[src] / t, dim=-1), nan=0.0, posinf=0.0, neginf=0.0)
            p_t = torch.softmax(zf[tg] / t, dim=-1)
            mix = torch.einsum("stb,sbc->tbc", w_kl, p_s)  # sum_s w_st p_s
            grad[tg] += t * (w_kl.sum(0).unsqueeze(-1) * p_t - mix)
        if plan.ce_targets:
            tg = list(plan.ce_targets)
            w0 = weights[0, 1:][tg].unsqueeze(-1)  # (T, B, 1)
            q = torch.softmax(zf[tg], dim=-1)
            onehot = torch.zeros_like(q).scatter_(-1, safe_labels.expand(len(tg), b).unsqueeze(-1), 1.0)
            grad[tg] += torch.where(w0 != 0, w0 * (q - onehot), 0.0)
    return res, grad


def take(x: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """``x[idx]`` along dim 0: a view when ``idx`` is a contiguous run (no copy, and a cheap backward)."""
    if list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return x if len(idx) == x.shape[0] else x[idx[0]: idx[0] + len(idx)]
    return x[list(idx)]


@functools.lru_cache(maxsize=256)
def _index_tensor(idx: tuple, device: str) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def cached_codes(key: tuple, device: str) -> torch.Tensor:
    return torch.tensor(key, dtype=torch.int32, device=device)
