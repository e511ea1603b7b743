"""The Triton kernels of the fused graph loss, one namespace (``K`` to the launchers and the AOT build).

Kernels:
    _fused_kernel        the whole loss for blocks of rows (the usual case), here.
    _split_stats_kernel  pass 1 over a chunk of C        (few rows, large C:
    _split_grad_kernel   pass 2 over a chunk of C         C split across
    _split_loss_kernel   merge X of the chunks, losses    programs; _triton_split_c)
    _scale_kernel        backward: grad[m] *= grad_output[m] (skipped when 1), or the
                         same into a new buffer of the logits' dtype (fp16 logits), here.

The per-row building blocks they share, and the notation, are in :mod:`._triton_rows`.
The linear gate's progress is read per destination node at ``progress_ptr[x * s_p]``:
``s_p`` is 0 for one progress for every edge (a 0-dim tensor), the stride of an (M,)
tensor otherwise; it is never specialised on, so both forms run the same compiled kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton_rows import (_LOG2E, _block_nodes, _label_logits, _pass2_block, _pass2_loop,
                           _program_consts, _row_loss, _settle_row, _stats_pass, _stats_update, _store_partials)
from ._triton_split_c import _split_grad_kernel, _split_loss_kernel, _split_stats_kernel

__all__ = ["_LOG2E", "_fused_kernel", "_split_stats_kernel", "_split_grad_kernel", "_split_loss_kernel",
           "_scale_kernel"]


@triton.jit(do_not_specialize=["s_p"])
def _fused_kernel(
    logits_ptr, labels_ptr, gates_ptr, progress_ptr, count_ptr, grad_ptr, edge_ptr, node_ptr, nodes_ptr,
    B, C, s_m, s_b, s_y, s_p, ignore_index,
    M: tl.constexpr, MP: tl.constexpr, MP1: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    COUNT_IN_KERNEL: tl.constexpr, LABEL_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    T: tl.constexpr, K_T: tl.constexpr, SAME_T: tl.constexpr, GATHER: tl.constexpr,
):
    """The whole graph loss of rows [pid*ROWS, (pid+1)*ROWS): stats, gates, losses, gradients.

    logits (M', B, C) with strides (s_m, s_b, 1); grad (M', B, C) contiguous; progress of
    edges into node x at progress_ptr[x * s_p] (s_p = 0: one value for every edge);
    edge_ptr / node_ptr: this program's (M+1, M+1) / (M,) partial sums.

    GATHER (a block launch, grid axis 1 over NB blocks of M nodes each, M' = NB * M): block k
    holds nodes nodes_ptr[k, :] (int32, (NB, M), a permutation of 0..M'-1 overall) with gate codes
    gates_ptr[k] ((NB, M+1, M+1), block-local order, the label first) and partial sums at
    edge_ptr[k, pid] / node_ptr[k, pid] ((NB, P, M+1, M+1) / (NB, P, M), block-local order).  Edges
    only within blocks, so a pack of K trials costs K * M^2 pairs per row, not (K * M)^2.
    """
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    idx = _block_nodes(nodes_ptr, blk, M, MP, GATHER)
    nodes = tl.arange(0, MP)
    nmask = nodes < M
    node_off = idx.to(tl.int64) * s_m
    gnode_off = idx.to(tl.int64) * B * C
    if GATHER:
        gates_ptr += blk * ((M + 1) * (M + 1))
    w_kl, is_corr, w_lab, need, inv = _program_consts(gates_ptr, progress_ptr, s_p, idx, labels_ptr, count_ptr, B,
                                                      s_y, ignore_index, M, MP, COUNT_IN_KERNEL, LABEL_BLOCK)
    acc_kl = tl.zeros([MP, MP], tl.float32)
    acc_lab = tl.zeros([MP], tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        row_ok = row < B
        y = tl.load(labels_ptr + row.to(tl.int64) * s_y, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index)
        lm = need & valid  # nodes read on this row
        row_ptr = logits_ptr + row.to(tl.int64) * s_b
        grow_ptr = grad_ptr + row.to(tl.int64) * C
        if SINGLE_BLOCK:
            # The row fits in one block: read it once and keep it in registers.
            cols = tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask2 = lm[:, None] & cmask[None, :]
            z = tl.load(row_ptr + node_off[:, None] + cols[None, :], mask=mask2, other=float("-inf")).to(tl.float32)
            m, s_t, s_1, amax = _stats_update(
                z, 0, tl.full([MP], float("-inf"), tl.float32), tl.zeros([MP], tl.float32),
                tl.zeros([MP], tl.float32), tl.zeros([MP], tl.int32), K_T, SAME_T)
            m_ref, s_t, s_1, w, w0, wsum = _settle_row(m, s_t, s_1, lm, w_kl, is_corr, w_lab, amax, y, valid)
            X = _pass2_block(tl.where(mask2, z, 0.0), cols, cmask, lm, nmask, m_ref, 1.0 / s_t, 1.0 / s_1,
                             w, w0, wsum, y, inv, tl.zeros([MP, MP], tl.float32),
                             grow_ptr, gnode_off, row_ok, WRITE_GRAD, T, K_T, SAME_T)
        else:
            m, s_t, s_1, amax = _stats_pass(row_ptr, node_off, lm, 0, C, MP, BLOCK_C, K_T, SAME_T)
            m_ref, s_t, s_1, w, w0, wsum = _settle_row(m, s_t, s_1, lm, w_kl, is_corr, w_lab, amax, y, valid)
            X = _pass2_loop(row_ptr, node_off, lm, nmask, 0, C, m_ref, 1.0 / s_t, 1.0 / s_1, w, w0, wsum, y,
                            inv, grow_ptr, gnode_off, row_ok, MP, BLOCK_C, WRITE_GRAD, T, K_T, SAME_T)
        zy = _label_logits(row_ptr, node_off, y, C, lm, w0)
        edge_kl, edge_lab = _row_loss(X, m_ref, s_t, s_1, zy, w, w0, MP, T)
        acc_kl += edge_kl
        acc_lab += edge_lab
    if GATHER:  # (offset here, not above: nothing of it stays live through the rows)
        edge_ptr += blk.to(tl.int64) * tl.num_programs(0) * ((M + 1) * (M + 1))
        node_ptr += blk.to(tl.int64) * tl.num_programs(0) * M
    _store_partials(edge_ptr, node_ptr, pid, acc_kl, acc_lab, inv, M, MP, MP1)


@triton.jit
def _scale_loop(src_ptr, dst_ptr, node, g, N, BLOCK: tl.constexpr):
    """dst[node, :] = src[node, :] * g over blocks pid, pid + P, ... (a stride loop over a fixed grid)."""
    base = node.to(tl.int64) * N
    # An int64 loop variable: an int32 one wraps past 2^31 when N is within one stride (P * BLOCK) of it,
    # and the loop then runs on at negative offsets.
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, N, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(src_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst_ptr + base + offs, (x * g).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, dst_ptr, gout_ptr, s_g, N, BLOCK: tl.constexpr, IN_PLACE: tl.constexpr):
    """dst[m, :] = src[m, :] * gout[m] over flat (M, N) buffers; grid (P, M) with P small and fixed.

    In place (src is dst), a node whose gout is 1 costs no memory traffic; out of place (an fp32
    gradient cast to fp16 logits' dtype) every node is written.
    """
    node = tl.program_id(1)
    g = tl.load(gout_ptr + node * s_g).to(tl.float32)
    if IN_PLACE:
        if g != 1.0:
            _scale_loop(src_ptr, dst_ptr, node, g, N, BLOCK)
    else:
        _scale_loop(src_ptr, dst_ptr, node, g, N, BLOCK)
