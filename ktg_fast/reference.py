"""The vectorised PyTorch graph loss: the oracle every fast path is tested against (docs/SEMANTICS.md).

:func:`graph_loss_reference` computes every edge at once (a loop over gate kinds, never over
edges); :func:`reference_with_grad` also gives the gradient in closed form, as the kernel does.
:class:`EdgePlan` is what a gate matrix asks for, derived once (``GraphLoss`` binds it).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import gates as _gates
from .live_gates import LiveGates
from .loss_inputs import (GatesLike, GraphLossResult, LogitsLike, check_labels, check_temperature, flatten_batch,
                          prepare_gates, progress_tensor, stack_logits)

__all__ = ["EdgePlan", "edge_plan", "live_plan", "gate_weights", "graph_loss_reference", "reference_loss", "reference_with_grad",
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
    label is ``ignore_index`` count nowhere; a batch with no counted row (all
    ignored, or empty) gives zero losses and zero gradients.  Targets whose inputs
    are all cutoff cost nothing: their loss is an exact 0 (with every edge cutoff,
    one that still backpropagates zero gradients when the logits require grad).
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

    codes: torch.Tensor  # (M+1, M+1) int64 on the CPU (shared by every plan of these codes: do not modify)
    key: tuple[tuple[int, ...], ...]  # the same as nested tuples (device copies are cached by it)
    kinds: tuple[int, ...]  # the non-cutoff gate codes present
    needs_correct: bool  # some gate other than cutoff, through, linear (it may read correctness)
    kl_targets: tuple[int, ...]  # 0-based nodes with a non-cutoff KL input (frozen nodes cost nothing)
    kl_sources: tuple[int, ...]  # 0-based nodes feeding those targets
    ce_targets: tuple[int, ...]  # 0-based nodes with a label edge
    kernel_ok: bool  # built-in gates only: the Triton kernel can run it
    # Built-in gates only (else None): the gate code of every KL edge (kl_sources x kl_targets) and of
    # every label edge (ce_targets), from which the per-sample weights are built in a few ops.
    kl_table: Optional[tuple[tuple[int, ...], ...]] = None
    ce_table: Optional[tuple[int, ...]] = None
    # Flat (M+1)^2 positions of the edges computed: KL (kl_sources x kl_targets, row-major), then label.
    slots: tuple[int, ...] = ()
    # Gates rewritten in place (ktg_fast.live_gates): every edge its blocks may hold is computed, and the
    # weights come from its device masks at run time; ``codes``/``key`` are then only the first matrix.
    live: Optional["LiveGates"] = None

    @property
    def num_nodes(self) -> int:
        return self.codes.shape[0] - 1


def edge_plan(codes: torch.Tensor) -> EdgePlan:
    """The plan of a validated (M+1, M+1) code matrix; cached by its codes (a call costs a ``tolist``)."""
    return _plan_of(tuple(map(tuple, codes.tolist())))


def live_plan(live: "LiveGates") -> EdgePlan:
    """The plan of gates set in place: KL edges among ``live.kl_nodes`` (every pair; those between blocks
    stay cutoff and cost an exact zero), a label edge into every node, the built-in gates."""
    m, kl = live.num_nodes, live.kl_nodes
    slots = tuple((s + 1) * (m + 1) + t + 1 for s in kl for t in kl) + tuple(range(1, m + 1))
    return EdgePlan(torch.tensor(live.key, dtype=torch.int64), live.key, tuple(sorted(_gates.KERNEL_GATES - {
        _gates.CUTOFF})), True, kl, kl, tuple(range(m)), True, None, None, slots, live)


@functools.lru_cache(maxsize=256)
def _plan_of(key: tuple[tuple[int, ...], ...]) -> EdgePlan:
    cut = _gates.CUTOFF
    m = len(key) - 1
    kinds = tuple(sorted({c for row in key for c in row} - {cut}))
    kl_targets = tuple(t for t in range(m) if any(key[s + 1][t + 1] != cut for s in range(m)))
    kl_sources = tuple(s for s in range(m) if any(key[s + 1][t + 1] != cut for t in kl_targets))
    ce_targets = tuple(t for t in range(m) if key[0][t + 1] != cut)
    kernel_ok = all(c in _gates.KERNEL_GATES for c in kinds)
    kl_table = tuple(tuple(key[s + 1][t + 1] for t in kl_targets) for s in kl_sources) if kernel_ok else None
    ce_table = tuple(key[0][t + 1] for t in ce_targets) if kernel_ok else None
    slots = tuple((s + 1) * (m + 1) + t + 1 for s in kl_sources for t in kl_targets) + tuple(t + 1 for t in ce_targets)
    return EdgePlan(torch.tensor(key, dtype=torch.int64), key, kinds,
                    any(c not in (_gates.THROUGH, _gates.LINEAR) for c in kinds), kl_targets, kl_sources, ce_targets,
                    kernel_ok, kl_table, ce_table, slots)


def gate_weights(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, dtype: torch.dtype,
                 progress: Union[float, torch.Tensor], ignore_index: int
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Per-sample edge weights (gate weight / B_eff, 0 on ignored rows) and labels safe to gather.

    Returns ``w_kl`` (S, T, B) over ``plan.kl_sources`` x ``plan.kl_targets`` (None without KL edges),
    ``w_ce`` (T', B) over ``plan.ce_targets`` (None without label edges) and the safe labels.
    ``progress``: a float, a 0-dim tensor or an (M,) tensor (edges into node t weigh progress[t-1]).
    """
    m, b, _ = z.shape
    dev = z.device
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    # An all-ignored batch yields zeros, not 0/0 = NaN.
    inv_b = valid.to(dtype) / valid.sum().to(dtype).clamp(min=1.0)  # (B,) per-row weight 1/B_eff or 0
    prog = progress_tensor(progress, m, dev, dtype)
    if plan.live is not None:
        w_kl, w_ce = plan.live.weights(z, safe_labels, dtype, prog)
    elif plan.kl_table is not None:
        w_kl, w_ce = _builtin_weights(z, labels, plan, dtype, prog)
    else:
        w_kl, w_ce = _registry_weights(z, labels, plan, dtype, prog)
    # The batch mean and the ignore mask folded into the weights.
    return (None if w_kl is None else w_kl * inv_b), (None if w_ce is None else w_ce * inv_b), safe_labels


def _builtin_weights(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, dtype: torch.dtype,
                     prog: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Built-in gates: a where() per gate kind present on the edges that exist, from cached tables."""
    dev = str(z.device)
    w_kl = w_ce = None
    if plan.kl_targets:
        tab = _tables(plan.kl_table, dev, dtype)  # (S, T, 1) through weights, linear and correct masks
        w_kl = tab.through
        if tab.any_linear:
            p = prog if prog.dim() == 0 else take(prog, plan.kl_targets).view(1, -1, 1)  # per destination
            w_kl = torch.where(tab.linear, p, w_kl)
        if tab.any_correct:  # the source's argmax against the label, per row
            right = take(z, plan.kl_sources).detach().argmax(dim=-1) == labels
            w_kl = torch.where(tab.correct, right.to(dtype).unsqueeze(1), w_kl)
    if plan.ce_targets:
        tab = _tables(plan.ce_table, dev, dtype)  # (T', 1): on a label edge correct acts as through
        w_ce = tab.through
        if tab.any_linear:
            p = prog if prog.dim() == 0 else take(prog, plan.ce_targets).view(-1, 1)
            w_ce = torch.where(tab.linear, p, w_ce)
    return w_kl, w_ce


def _registry_weights(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, dtype: torch.dtype,
                      prog: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Any registered gates: each kind's weight function, on an (M+1, M+1, B) [source, destination] grid.

    With one progress per destination, built-in linear reads it per column, and a custom gate is
    called once per destination t with ``ctx.progress = progress[t-1]`` (it always sees one value).
    """
    m, b, _ = z.shape
    dev = z.device
    correct = None
    if plan.needs_correct:
        # The label source (row 0) is always correct.
        correct = torch.cat(
            [torch.ones(1, b, dtype=torch.bool, device=dev), z.detach().argmax(dim=-1) == labels.unsqueeze(0)]
        )
    per_node = prog.dim() == 1
    ctx = _gates.GateContext(source_logits=z.detach(), labels=labels, progress=prog, correct=correct)
    weights = torch.zeros(m + 1, m + 1, b, dtype=dtype, device=dev)
    codes_dev = cached_codes(plan.key, str(dev))  # cached: no host copy per step (CUDA-graph capturable)

    def per_source(w) -> torch.Tensor:  # a weight broadcastable to (M+1, B) [source, sample]
        # A Python number becomes a device fill, not a host-to-device copy.
        w = torch.full((), float(w), dtype=dtype, device=dev) if not isinstance(w, torch.Tensor) else w.to(dev, dtype)
        return torch.broadcast_to(w, (m + 1, b))

    for code in plan.kinds:  # a loop over gate kinds (at most a handful), never over edges
        gate = _gates.get_gate(code)
        if per_node and code == _gates.LINEAR:
            w = torch.cat([prog.new_zeros(1), prog]).view(1, m + 1, 1)  # [., destination, .]; column 0 unused
        elif per_node and not gate.builtin:
            cols = [per_source(gate.weight(replace(ctx, progress=prog[t - 1], destination=t)))
                    for t in range(1, m + 1)]
            w = torch.stack([torch.zeros_like(cols[0])] + cols, dim=1)  # (M+1, M+1, B)
        else:
            w = per_source(gate.weight(ctx)).unsqueeze(1)  # every destination alike
        weights = torch.where((codes_dev == code).unsqueeze(-1), w, weights)
    w_kl = weights[1:, 1:][list(plan.kl_sources)][:, list(plan.kl_targets)] if plan.kl_targets else None
    w_ce = weights[0, 1:][list(plan.ce_targets)] if plan.ce_targets else None
    return w_kl, w_ce


class _Tables(NamedTuple):
    through: torch.Tensor  # float weight 1 where the gate is through (correct too, on label edges), else 0
    linear: torch.Tensor  # bool
    correct: torch.Tensor  # bool
    any_linear: bool
    any_correct: bool


@functools.lru_cache(maxsize=256)
def _tables(table: tuple, device: str, dtype: torch.dtype) -> _Tables:
    """Device masks of a gate-code table: (S, T) KL codes -> (S, T, 1), (T',) label codes -> (T', 1)."""
    kl = isinstance(table[0], tuple)
    flat = [c for row in table for c in row] if kl else list(table)
    through = (_gates.THROUGH,) if kl else (_gates.THROUGH, _gates.CORRECT)
    shape = (len(table), len(table[0]), 1) if kl else (len(table), 1)

    def mask(codes) -> list:
        return [c in codes for c in flat]

    return _Tables(torch.tensor(mask(through), dtype=dtype, device=device).view(shape),
                   torch.tensor(mask((_gates.LINEAR,)), device=device).view(shape),
                   torch.tensor(mask((_gates.CORRECT,)) if kl else [False] * len(flat), device=device).view(shape),
                   _gates.LINEAR in flat, kl and _gates.CORRECT in flat)


def reference_loss(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, t: float,
                   progress: Union[float, torch.Tensor], ignore_index: int) -> GraphLossResult:
    """The reference on validated inputs (see :func:`graph_loss_reference`)."""
    return _reference(z, labels, plan, t, progress, ignore_index)[0]


def _reference(z: torch.Tensor, labels: torch.Tensor, plan: EdgePlan, t: float,
               progress: Union[float, torch.Tensor], ignore_index: int) -> tuple:
    """(losses, w_kl, w_ce, safe_labels): the losses and the weights they were formed with."""
    m, b, c = z.shape
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    dev = z.device
    zf = z.to(dtype)
    labels = labels.to(dev)
    w_kl, w_ce, safe_labels = gate_weights(z, labels, plan, dtype, progress, ignore_index)

    edge = torch.zeros(m + 1, m + 1, dtype=dtype, device=dev)
    parts = []  # the KL edges' losses (S * T), then the label edges' (T')
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
        # where(), not w * l: a cutoff edge (or an ignored row) is exactly 0 whatever l holds.
        parts.append(torch.where(w_kl != 0, w_kl * per_sample, 0.0).sum(-1).flatten())

    ce_targets = list(plan.ce_targets)
    if ce_targets:
        zt = take(zf, ce_targets)
        n = len(ce_targets)
        # The fused log-softmax + NLL (a masked label class gives +inf, ignored rows 0).
        y = safe_labels.long() if n == 1 else safe_labels.long().expand(n, b).reshape(-1)
        ce = torch.nn.functional.cross_entropy(zt.reshape(n * b, c), y, reduction="none").view(n, b)
        parts.append(torch.where(w_ce != 0, w_ce * ce, 0.0).sum(-1))

    if parts:  # one scatter of every edge's loss into the (M+1, M+1) matrix
        vals = parts[0] if len(parts) == 1 else torch.cat(parts)
        edge = edge.view(-1).index_put((_index_tensor(plan.slots, str(dev)),), vals).view(m + 1, m + 1)
    elif zf.requires_grad:
        # Every edge cutoff: the losses are exact zeros that still backpropagate (zero gradients), as the
        # kernel's do, so a training loop's node_loss.sum().backward() works whatever the gates.  A sum over
        # no classes: 0 even where the logits hold inf or NaN (0 * z would not be).
        edge = edge + zf[..., :0].sum()
    return GraphLossResult(node_loss=edge[:, 1:].sum(0), edge_loss=edge), w_kl, w_ce, safe_labels



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
        res, w_kl, w_ce, safe_labels = _reference(z, labels, plan, temperature, progress, ignore_index)
        m, b, c = z.shape
        dtype = res.edge_loss.dtype
        zf = z.to(dtype)
        grad = torch.zeros(m, b, c, dtype=dtype, device=z.device)
        t = float(temperature)
        if plan.kl_targets:
            tg, src = list(plan.kl_targets), list(plan.kl_sources)
            p_s = torch.nan_to_num(torch.softmax(zf[src] / t, dim=-1), nan=0.0, posinf=0.0, neginf=0.0)
            p_t = torch.softmax(zf[tg] / t, dim=-1)
            mix = torch.einsum("stb,sbc->tbc", w_kl, p_s)  # sum_s w_st p_s
            grad[tg] += t * (w_kl.sum(0).unsqueeze(-1) * p_t - mix)
        if plan.ce_targets:
            tg = list(plan.ce_targets)
            w0 = w_ce.unsqueeze(-1)  # (T, B, 1)
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
