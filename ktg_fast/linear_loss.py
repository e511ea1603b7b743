"""The graph loss straight from hidden states: every node's output layer fused with the loss, in chunks.

At LLM vocabularies the logits are the problem, not the arithmetic: three nodes
at N = 8192 tokens and V = 128,256 hold 12.6 GB of float32 logits, the same
again for their gradients.  :class:`GraphLinearLoss` never holds them all: it
splits the N rows into chunks and, per chunk, computes each node's logits (one
matmul per node), runs the graph loss with its gradient (the fused kernel on
CUDA, which writes it during its forward; the closed-form reference
elsewhere), turns that gradient into the hidden-state, weight and bias
gradients with matmuls, and frees the chunk before the next.  The backward
only scales the stored gradients by ``grad_output``.  Peak memory is one
chunk's logits and gradient plus the outputs, whatever N is.

The idea is Liger-Kernel's chunked distillation losses (one student-teacher
pair) carried to a graph of M models with gates.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .loss import GraphLoss
from .loss_inputs import GatesLike, GraphLossResult, check_label_kind, progress_tensor

__all__ = ["GraphLinearLoss"]

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]

# Without a device to ask (the CPU), chunks are sized to this many bytes of per-chunk work.
_CPU_BUDGET = 512 * 2 ** 20
# Bytes per logit a chunk costs beyond the logits themselves: the gradient and the reference's fp32
# temporaries (softmaxes, the pairwise products); conservative for the kernel, which needs one buffer.
_BYTES_PER_LOGIT = 24


@torch.compiler.assume_constant_result
def _free_bytes(index: int) -> int:
    return int(torch.cuda.mem_get_info(index)[0])


def auto_chunk_size(m: int, v: int, n: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk: a quarter of the device's free memory (512 MiB on the CPU) over one row's cost.

    One row costs M * V * (element size + 24) bytes: its logits, their gradient and the float32
    temporaries of the reference path.  At least 1 row, at most ``n``.
    """
    if device.type == "cuda":
        budget = _free_bytes(device.index if device.index is not None else torch.cuda.current_device()) // 4
    else:
        budget = _CPU_BUDGET
    per_row = m * v * (torch.empty((), dtype=dtype).element_size() + _BYTES_PER_LOGIT)
    return max(1, min(n, budget // max(per_row, 1)))


def _as_list(x: Optional[TensorList], m: int, what: str, allow_none: bool = False) -> list:
    """``x`` as a list of M entries (a tensor is split along dim 0), floating-point tensors (or None)."""
    if x is None:
        if allow_none:
            return [None] * m
        raise TypeError(f"{what} is required")
    items = list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)
    if len(items) != m:
        if what == "hidden":  # the first one checked: the gate matrix fixed M when the loss was built
            whose = "node's" if len(items) == 1 else "nodes'"
            raise ValueError(f"hidden holds {len(items)} {whose} hidden states but the gate matrix is {m + 1}x{m + 1} "
                             f"({m} network node{'s' if m != 1 else ''}): pass {m}, or build the loss with a "
                             f"{len(items) + 1}x{len(items) + 1} gate matrix (label node 0 plus one row per network)")
        raise ValueError(f"{what} must hold one entry per network node: {m}, as hidden and the {m + 1}x{m + 1} "
                         f"gate matrix have, got {len(items)}")
    for i, t in enumerate(items):
        if t is None and allow_none:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{what}[{i}] must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    return items


class _ChunkedGraphLinear(torch.autograd.Function):
    """Forward: the losses and every gradient, chunk by chunk; backward: scale them by grad_output."""

    @staticmethod
    def forward(ctx, loss: GraphLoss, chunk: int, labels: torch.Tensor, progress, m: int, *tensors):
        hidden, weights, biases = tensors[:m], tensors[m:2 * m], tensors[2 * m:]
        needs = ctx.needs_input_grad[5:]
        need_h, need_w, need_b = needs[:m], needs[m:2 * m], needs[2 * m:]
        n, v = hidden[0].shape[0], weights[0].shape[0]
        dev = hidden[0].device
        cdtype = hidden[0].dtype
        for x in (*hidden, *weights, *(b for b in biases if b is not None)):
            cdtype = torch.promote_types(cdtype, x.dtype)
        # float16 gradients of order p / N underflow: they are formed and kept in float32 (GradScaler's
        # factor comes in backward); bfloat16 has float32's range and stays bfloat16.
        gdtype = torch.float32 if cdtype == torch.float16 else cdtype
        ldtype = torch.float64 if cdtype == torch.float64 else torch.float32  # losses accumulate in this
        mm_w = [w.to(gdtype) if need_h[i] and w.dtype != gdtype else w for i, w in enumerate(weights)]
        grad_h = [torch.empty(h.shape, dtype=gdtype, device=dev) if need_h[i] else None
                  for i, h in enumerate(hidden)]
        grad_w = [torch.zeros(w.shape, dtype=gdtype, device=dev) if need_w[i] else None
                  for i, w in enumerate(weights)]
        grad_b = [torch.zeros(v, dtype=ldtype, device=dev) if (b is not None and need_b[i]) else None
                  for i, b in enumerate(biases)]
        valid = labels != loss.ignore_index
        total = valid.sum().clamp(min=1).to(ldtype)
        node_loss = torch.zeros(m, dtype=ldtype, device=dev)
        edge_loss = torch.zeros(m + 1, m + 1, dtype=ldtype, device=dev)
        for n0 in range(0, n, chunk):
            n1 = min(n, n0 + chunk)
            z = torch.empty(m, n1 - n0, v, dtype=cdtype, device=dev)
            for i in range(m):
                h, w, b = hidden[i][n0:n1], weights[i], biases[i]
                if h.dtype == w.dtype == cdtype and (b is None or b.dtype == cdtype):
                    if b is None:
                        torch.mm(h, w.t(), out=z[i])
                    else:
                        torch.addmm(b, h, w.t(), out=z[i])
                else:
                    z[i].copy_(nn.functional.linear(h.to(cdtype), w.to(cdtype), None if b is None else b.to(cdtype)))
            res, g = loss.loss_and_grad(z, labels[n0:n1], progress)
            del z
            # The chunk was averaged over its own counted rows; weigh it by its share of the batch's.
            share = valid[n0:n1].sum().to(ldtype) / total
            # Out of place: under torch.compile, torch 2.11 hands backward a zero grad_output for an output
            # that was updated in place after it was made (tests/test_linear_loss.py catches it).
            node_loss = node_loss + res.node_loss.to(ldtype) * share
            edge_loss = edge_loss + res.edge_loss.to(ldtype) * share
            if not (any(need_h) or any(need_w) or any(need_b)):
                continue
            g = g.to(gdtype)
            for i in range(m):
                gi = g[i]
                if need_h[i]:
                    torch.mm(gi, mm_w[i], out=grad_h[i][n0:n1])
                    grad_h[i][n0:n1].mul_(share.to(gdtype))
                if need_w[i]:
                    # d/dW = g^T h; the chunk's share folded into h (n x D), never into g (n x V).
                    grad_w[i].addmm_(gi.t(), hidden[i][n0:n1].to(gdtype) * share.to(gdtype))
                if grad_b[i] is not None:
                    grad_b[i] += gi.sum(0).to(ldtype) * share
            del g
        ctx.m = m
        ctx.save_for_backward(*[x for x in (*grad_h, *grad_w, *grad_b) if x is not None])
        ctx.present = [x is not None for x in (*grad_h, *grad_w, *grad_b)]
        ctx.out_dtypes = [None if x is None else x.dtype for x in tensors]
        return node_loss, edge_loss

    @staticmethod
    def backward(ctx, g_node, g_edge):
        saved = iter(ctx.saved_tensors)
        m = ctx.m
        grads = []
        for k, present in enumerate(ctx.present):
            if not present:
                grads.append(None)
                continue
            gr = next(saved)
            scale = g_node[k % m].to(gr.dtype) if g_node is not None else gr.new_zeros(())
            grads.append((gr * scale).to(ctx.out_dtypes[k]))
        return (None, None, None, None, None, *grads)


class GraphLinearLoss(nn.Module):
    """The graph loss of M nodes' output layers, from their hidden states, without holding all logits.

    ``loss(hidden, weights, labels, bias=None, progress=1.0)`` returns what
    :func:`~ktg_fast.loss.graph_loss` returns on the materialized logits
    ``hidden[m] @ weights[m].T + bias[m]``: ``node_loss`` (M,) and ``edge_loss``
    (M+1, M+1), float32 (float64 for float64 inputs), with gradients for every hidden state, weight and bias
    that requires them.  Frozen nodes (teachers: hidden states and weights
    without grad) cost no gradient work.  Every gate, temperature and
    ``progress`` behave as in ``graph_loss``; bfloat16 and float16 inputs
    accumulate the loss in float32.

    Args:
        gates: (M+1, M+1) gate matrix [source][destination] (names or integer codes), or a Graph.
        temperature: T of the KL edges (None: the Graph's, or 1.0), as in :class:`~ktg_fast.loss.GraphLoss`.
        chunk_size: rows per chunk; ``None`` picks it from the free memory of the
            device: a quarter of it (512 MiB on the CPU) over one row's cost,
            M * V * (element size + 24) bytes (:func:`auto_chunk_size`).
        impl: "auto", "triton" or "reference", as in :class:`~ktg_fast.loss.GraphLoss`.
        ignore_index: label of rows that count nowhere (a chunk of only such rows costs its matmuls).

    Call args:
        hidden: M tensors (N, D_m), each node its own hidden size, or one (M, N, D);
            any leading dimensions (*, D) are flattened (labels (*) with them), but there must be one:
            a single row is (1, D), not (D,).  N = 0 (or every row ignored) gives zero losses and
            zero gradients (docs/SEMANTICS.md).
        weights: M output matrices (V, D_m) (``nn.Linear.weight``), or one (M, V, D).
        labels: (N,) or (*) int64 / int32, on the hidden states' device.
        bias: None, or M biases (V,) (None entries allowed), or one (M, V).
        progress: k / k_end of linear gates, a float or a 0-dim tensor, or an (M,) tensor with one
            value per destination node (edges s -> t weigh progress[t-1]), as in ``graph_loss``
            (default 1.0 there and here: a linear gate then passes its whole loss).

    Memory: one chunk's logits (M, chunk, V) and their gradient, plus the gradients
    returned (hidden-sized and weight-sized, in the inputs' dtype, float32 for
    float16); the weight gradient is accumulated across chunks in its own dtype
    (fp32 accumulation inside each chunk's matmul).

    Raises:
        ValueError / TypeError naming the argument: a node count other than the gate
        matrix's (named with its size), hidden states without a row dimension, shapes,
        dtypes or devices that do not agree (labels included), a chunk size below 1.
    """

    def __init__(self, gates: GatesLike, temperature: Optional[float] = None, *, chunk_size: Optional[int] = None,
                 impl: str = "auto", ignore_index: int = -100):
        super().__init__()
        self.loss = GraphLoss(gates, temperature, impl=impl, ignore_index=ignore_index)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(self, hidden: TensorList, weights: TensorList, labels: torch.Tensor,
                bias: Optional[TensorList] = None, progress: Union[float, torch.Tensor] = 1.0) -> GraphLossResult:
        m = self.loss.num_nodes
        hs = _as_list(hidden, m, "hidden")
        ws = _as_list(weights, m, "weights")
        bs = _as_list(bias, m, "bias", allow_none=True)
        for i, h in enumerate(hs):
            if h.dim() < 2:
                raise ValueError(f"hidden[{i}] is {tuple(h.shape)}: each node's hidden states need a row dimension, "
                                 "(N, D) or (*, D); for one row pass h.unsqueeze(0), (1, D) (a stacked (M, D) tensor: "
                                 ".unsqueeze(1)), with labels of shape (1,)")
        lead = tuple(hs[0].shape[:-1])
        for i, h in enumerate(hs[1:], start=1):
            if tuple(h.shape[:-1]) != lead:
                raise ValueError(f"hidden[{i}] is {tuple(h.shape)} but hidden[0] is {tuple(hs[0].shape)}: every node's "
                                 f"hidden states must have the same rows, (*, D_m) with * = {lead}")
        check_label_kind(labels, hs[0].device, "hidden[0]", "is")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must be {lead} to match hidden states {tuple(hs[0].shape)}, "
                             f"got {tuple(labels.shape)}")
        hs = [h.reshape(-1, h.shape[-1]) for h in hs]
        labels = labels.reshape(-1)
        for i, (h, w) in enumerate(zip(hs, ws)):
            d = h.shape[1]
            if w.dim() != 2 or w.shape[1] != d:
                flipped = " (it looks transposed: pass nn.Linear.weight, (V, D), or w.T)" \
                    if w.dim() == 2 and w.shape[0] == d else ""
                raise ValueError(f"weights[{i}] must be (V, D) with D = {d}, the size of hidden[{i}], "
                                 f"got {tuple(w.shape)}{flipped}")
        v = ws[0].shape[0]
        dev = hs[0].device
        for i, (h, w, b) in enumerate(zip(hs, ws, bs)):
            if w.shape[0] != v:
                raise ValueError(f"weights[{i}] has V = {w.shape[0]} rows, weights[0] has {v}: every node must "
                                 "share one vocabulary")
            if b is not None and b.shape != (v,):
                raise ValueError(f"bias[{i}] must be ({v},), got {tuple(b.shape)}")
            for name, x in (("hidden", h), ("weights", w), ("bias", b)):
                if x is not None and x.device != dev:
                    raise ValueError(f"{name}[{i}] is on {x.device} but hidden[0] is on {dev}")
        n = hs[0].shape[0]
        if n == 0:  # no row counts: zero losses and gradients (docs/SEMANTICS.md); progress is still checked
            progress_tensor(progress, m, dev)
        chunk = self.chunk_size or auto_chunk_size(m, v, n, dev, hs[0].dtype)
        node, edge = _ChunkedGraphLinear.apply(self.loss, max(1, min(chunk, n)), labels, progress, m,
                                               *hs, *ws, *bs)
        return GraphLossResult(node_loss=node, edge_loss=edge.detach())

    def extra_repr(self) -> str:
        return f"{self.loss.extra_repr()}, chunk_size={self.chunk_size}"
