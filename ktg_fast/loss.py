"""The graph loss: every edge of a knowledge transfer graph at once.

:func:`graph_loss` is the front door.  It dispatches to the fused Triton
kernel (``ktg_fast.kernels``) on CUDA tensors and to
:func:`graph_loss_reference`, a vectorised PyTorch implementation of
SEMANTICS.md, everywhere else.  The reference is the oracle every fast path is
tested against.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Union

import torch

from . import gates as _gates

__all__ = ["GraphLossResult", "graph_loss", "graph_loss_reference", "prepare_gates"]

LogitsLike = Union[torch.Tensor, Sequence[torch.Tensor]]
GatesLike = Union[torch.Tensor, Sequence[Sequence[Union[str, int]]]]


class GraphLossResult(NamedTuple):
    """Losses of one batch.

    Attributes:
        node_loss: (M,) loss L_t of each network node t = 1..M (index t-1).
            Its gradient reaches node t's logits only, so
            ``node_loss.sum().backward()`` trains every node by its own loss.
        edge_loss: (M+1, M+1) loss L_{s,t} of every edge [source][destination];
            zero for cutoff edges, the diagonal and column 0.
    """

    node_loss: torch.Tensor
    edge_loss: torch.Tensor


def _stack_logits(logits: LogitsLike) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f"logits must be (M, B, C) or a list of M (B, C) tensors, got shape {tuple(logits.shape)}")
        return logits
    logits = list(logits)
    if not logits:
        raise ValueError("logits is an empty list: pass one (B, C) tensor per network node")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every node's logits must be (B, C) with the same B and C, got shapes {sorted(shapes)}")
    return torch.stack(logits)


def prepare_gates(gates: GatesLike, num_nodes: int) -> torch.Tensor:
    """Validate a gate matrix for ``num_nodes`` network nodes; return int64 codes on the CPU.

    Raises ``ValueError`` naming the edge at fault for a wrong size or a
    non-cutoff gate on the diagonal or into the label (column 0).
    """
    codes = _gates.gate_codes(gates)
    if codes.shape[0] != num_nodes + 1:
        raise ValueError(
            f"gate matrix is {codes.shape[0]}x{codes.shape[0]} but logits hold {num_nodes} nodes: "
            f"it must be {num_nodes + 1}x{num_nodes + 1} (label node 0 plus one row per network)"
        )
    bad = [(s, 0) for s in range(num_nodes + 1) if codes[s, 0] != _gates.CUTOFF]
    bad += [(s, s) for s in range(1, num_nodes + 1) if codes[s, s] != _gates.CUTOFF]
    if bad:
        s, t = bad[0]
        what = "into the label node 0" if t == 0 else f"from node {s} to itself"
        raise ValueError(
            f"gate[{s}][{t}] is {_gates.get_gate(int(codes[s, t])).name!r}: there is no edge {what}; set it to 'cutoff'"
        )
    return codes


def _progress_tensor(
    progress: Union[float, torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    if isinstance(progress, torch.Tensor):
        if progress.numel() != 1:
            raise ValueError(f"progress must be a float or a 0-dim tensor, got shape {tuple(progress.shape)}")
        return progress.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(progress), device=device, dtype=dtype)


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
    z = _stack_logits(logits)
    m, b, c = z.shape
    codes = prepare_gates(gates, m)
    if labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) to match logits {tuple(z.shape)}, got {tuple(labels.shape)}")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    dev = z.device
    zf = z.to(dtype)
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    labels = labels.to(dev)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    n_valid = valid.sum().to(dtype)
    # An all-ignored batch yields zeros, not 0/0 = NaN.
    inv_b = valid.to(dtype) / n_valid.clamp(min=1.0)  # (B,) per-row weight 1/B_eff or 0

    # Per-sample gate weights W[s, t, n] for the edges that exist.
    prog = _progress_tensor(progress, dev, dtype)
    correct = None
    if any(cde not in (_gates.CUTOFF, _gates.THROUGH, _gates.LINEAR) for cde in codes.unique().tolist()):
        # The label source (row 0) is always correct.
        correct = torch.cat(
            [torch.ones(1, b, dtype=torch.bool, device=dev), z.detach().argmax(dim=-1) == labels.unsqueeze(0)]
        )
    ctx = _gates.GateContext(source_logits=z.detach(), labels=labels, progress=prog, correct=correct)
    weights = torch.zeros(m + 1, m + 1, b, dtype=dtype, device=dev)
    codes_dev = _device_codes(codes, dev)  # cached: no host copy per step (CUDA-graph capturable)
    for code in codes.unique().tolist():  # a loop over gate kinds (at most a handful), never over edges
        if code == _gates.CUTOFF:
            continue
        w = _gates.get_gate(code).weight(ctx)
        # A Python number becomes a device fill, not a host-to-device copy.
        w = torch.full((), float(w), dtype=dtype, device=dev) if not isinstance(w, torch.Tensor) else w.to(dev, dtype)
        w = torch.broadcast_to(w, (m + 1, b))
        weights = torch.where((codes_dev == code).unsqueeze(-1), w.unsqueeze(1), weights)
    weights = weights * inv_b  # fold the batch mean and the ignore mask into the weights

    edge = torch.zeros(m + 1, m + 1, dtype=dtype, device=dev)
    codes_kl = codes[1:, 1:]
    # Only targets with some non-cutoff KL input are computed: frozen nodes cost nothing.
    kl_targets = (codes_kl != _gates.CUTOFF).any(dim=0).nonzero().flatten().tolist()
    if kl_targets:
        kl_sources = (codes_kl[:, kl_targets] != _gates.CUTOFF).any(dim=1).nonzero().flatten().tolist()
        zs = zf[kl_sources].detach() / t
        logp_s = torch.log_softmax(zs, dim=-1)
        p_s = logp_s.exp()
        neg_entropy = (p_s * logp_s).sum(-1)  # (S, B): sum_c p_s log p_s
        logp_t = torch.log_softmax(zf[kl_targets] / t, dim=-1)
        cross = torch.einsum("sbc,tbc->stb", p_s, logp_t)  # sum_c p_s log p_t for every pair
        per_sample = (t * t) * (neg_entropy.unsqueeze(1) - cross)  # (S, T, B)
        w_kl = weights[1:, 1:][kl_sources][:, kl_targets]
        vals = (w_kl * per_sample).sum(-1)
        si = _index_tensor(tuple(s + 1 for s in kl_sources), str(dev))
        ti = _index_tensor(tuple(t + 1 for t in kl_targets), str(dev))
        edge = edge.index_put((si.unsqueeze(1), ti.unsqueeze(0)), vals)

    ce_targets = (codes[0, 1:] != _gates.CUTOFF).nonzero().flatten().tolist()
    if ce_targets:
        zt = zf[ce_targets]
        ce = torch.logsumexp(zt, dim=-1) - zt.gather(-1, safe_labels.expand(len(ce_targets), b).unsqueeze(-1)).squeeze(-1)
        vals = (weights[0, 1:][ce_targets] * ce).sum(-1)
        edge = edge.index_put((_index_tensor((0,) * len(ce_targets), str(dev)),
                               _index_tensor(tuple(t + 1 for t in ce_targets), str(dev))), vals)

    return GraphLossResult(node_loss=edge[:, 1:].sum(0), edge_loss=edge)


@functools.lru_cache(maxsize=256)
def _index_tensor(idx: tuple, device: str) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _cached_codes(key: tuple, device: str) -> torch.Tensor:
    return torch.tensor(key, dtype=torch.int32, device=device)


def _device_codes(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Cached, so repeated steps (and CUDA-graph capture) copy nothing from the host.
    return _cached_codes(tuple(map(tuple, codes.tolist())), str(device))


def _use_kernel(z: torch.Tensor, codes: torch.Tensor, impl: str) -> bool:
    if impl == "reference":
        return False
    kernel_ok = all(int(cde) in _gates.KERNEL_GATES for cde in codes.unique().tolist())
    if impl == "triton":
        if not kernel_ok:
            raise ValueError("impl='triton' supports the built-in gates only; use impl='reference' for custom gates")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if not (kernel_ok and z.is_cuda and z.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return False
    try:
        from . import kernels
    except ImportError:
        return False
    return hasattr(kernels, "graph_loss_triton") and kernels.is_available(z.device)


def graph_loss(
    logits: LogitsLike,
    labels: torch.Tensor,
    gates: GatesLike,
    *,
    temperature: float = 1.0,
    progress: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
) -> GraphLossResult:
    """Losses of every node and edge of a knowledge transfer graph for one batch.

    Args:
        logits: (M, B, C) stacked logits of network nodes 1..M, or a list of
            M (B, C) tensors (node order of the graph).
        labels: (B,) int64 class labels; rows equal to ``ignore_index`` are
            left out of every edge and of the batch count.
        gates: (M+1, M+1) gate matrix [source][destination] of gate names or
            integer codes (a nested list or an integer tensor); node 0 is the label.
        temperature: T of the KL edges (the label edge always uses T = 1).
        progress: k / k_end for linear gates, a float or a 0-dim tensor
            (a device tensor keeps CUDA-graph replays correct).
        ignore_index: label value of rows to ignore.
        impl: "auto" (Triton kernel on CUDA, reference elsewhere),
            "triton" (force the kernel; on CPU only under TRITON_INTERPRET=1)
            or "reference".

    Returns:
        :class:`GraphLossResult` with ``node_loss`` (M,) and ``edge_loss`` (M+1, M+1).
    """
    z = _stack_logits(logits)
    codes = prepare_gates(gates, z.shape[0])
    if not _use_kernel(z, codes, impl):
        return graph_loss_reference(
            z, labels, codes, temperature=temperature, progress=progress, ignore_index=ignore_index
        )
    from . import kernels

    if labels.shape != (z.shape[1],):
        raise ValueError(f"labels must be ({z.shape[1]},) to match logits {tuple(z.shape)}, got {tuple(labels.shape)}")
    node, edge = kernels.graph_loss_triton(
        z,
        labels.to(z.device),
        _device_codes(codes, z.device),
        float(temperature),
        _progress_tensor(progress, z.device),
        int(ignore_index),
    )
    return GraphLossResult(node_loss=node, edge_loss=edge)
