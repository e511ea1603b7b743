"""Split-C path of the graph loss: few rows, large C, each row's C split across programs.

Stats per (row, chunk) -> merged inside the grad kernel -> X per (row, chunk) -> merged
inside the loss kernel.  Buffers: stats (B, NSPLIT, 3, MP) float32 [m, S, S1], amax
(B, NSPLIT, MP) int32, xbuf (B, NSPLIT, MP, MP) float32.  Notation and building blocks:
:mod:`._triton_rows`; progress per destination node at ``progress_ptr[x * s_p]``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton_rows import (_gate_codes, _label_logits, _node_offsets, _pass2_loop, _program_consts, _row_loss,
                           _settle_row, _stats_pass, _store_partials)


@triton.jit
def _split_stats_kernel(
    logits_ptr, gates_ptr, stats_ptr, amax_ptr,
    C, s_m, s_b, CHUNK,
    M: tl.constexpr, MP: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_C: tl.constexpr,
    K_T: tl.constexpr, SAME_T: tl.constexpr,
):
    """Pass 1 of row pid(0) over chunk pid(1) of C (ignored rows are handled later: they cost a read here)."""
    row = tl.program_id(0)
    k = tl.program_id(1)
    nodes = tl.arange(0, MP)
    node_off = nodes.to(tl.int64) * s_m
    _, _, need = _gate_codes(gates_ptr, M, MP)
    c_lo = k * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, C)
    row_ptr = logits_ptr + row.to(tl.int64) * s_b
    m, s_t, s_1, amax = _stats_pass(row_ptr, node_off, need, c_lo, c_hi, MP, BLOCK_C, K_T, SAME_T)
    base = (row.to(tl.int64) * NSPLIT + k) * (3 * MP)
    tl.store(stats_ptr + base + nodes, m)
    tl.store(stats_ptr + base + MP + nodes, s_t)
    tl.store(stats_ptr + base + 2 * MP + nodes, s_1)
    tl.store(amax_ptr + (row.to(tl.int64) * NSPLIT + k) * MP + nodes, amax)


@triton.jit
def _merge_stats(stats_ptr, amax_ptr, row, MP: tl.constexpr, NSPLIT: tl.constexpr, NSP: tl.constexpr,
                 K_T: tl.constexpr, SAME_T: tl.constexpr):
    """Merge the chunks' (m, S, S1, argmax) of one row; m is returned raw (-inf if unread)."""
    nodes = tl.arange(0, MP)
    ks = tl.arange(0, NSP)
    kmask = (ks < NSPLIT)[:, None]
    base = stats_ptr + row.to(tl.int64) * (NSPLIT * 3 * MP) + ks[:, None] * (3 * MP) + nodes[None, :]
    mk = tl.load(base, mask=kmask, other=float("-inf"))
    stk = tl.load(base + MP, mask=kmask, other=0.0)
    m = tl.max(mk, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    s_t = tl.sum(stk * tl.exp2((mk - m_ref[None, :]) * K_T), axis=0)
    if SAME_T:
        s_1 = s_t
    else:
        s1k = tl.load(base + 2 * MP, mask=kmask, other=0.0)
        s_1 = tl.sum(s1k * tl.exp2((mk - m_ref[None, :]) * 1.4426950408889634), axis=0)
    ak = tl.load(amax_ptr + row.to(tl.int64) * (NSPLIT * MP) + ks[:, None] * MP + nodes[None, :], mask=kmask, other=0)
    # The first chunk holding the max has the first index of the max.
    first = tl.min(tl.where((mk == m[None, :]) & kmask, ks[:, None], NSP), axis=0)
    amax = tl.sum(tl.where(ks[:, None] == first[None, :], ak, 0), axis=0)
    return m, s_t, s_1, amax


@triton.jit(do_not_specialize=["s_p"])
def _split_grad_kernel(
    logits_ptr, labels_ptr, gates_ptr, progress_ptr, count_ptr, stats_ptr, amax_ptr, grad_ptr, xbuf_ptr,
    B, C, s_m, s_b, s_y, s_p, ignore_index, CHUNK,
    M: tl.constexpr, MP: tl.constexpr, NSPLIT: tl.constexpr, NSP: tl.constexpr, BLOCK_C: tl.constexpr,
    COUNT_IN_KERNEL: tl.constexpr, LABEL_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    T: tl.constexpr, K_T: tl.constexpr, SAME_T: tl.constexpr,
):
    """Pass 2 of row pid(0) over chunk pid(1): gradient of the chunk and its part of X."""
    row = tl.program_id(0)
    k = tl.program_id(1)
    nodes, nmask, node_off, gnode_off = _node_offsets(B, C, s_m, M, MP)
    w_kl, is_corr, w_lab, need, inv = _program_consts(gates_ptr, progress_ptr, s_p, tl.arange(0, MP), labels_ptr, count_ptr, B, s_y,
                                                      ignore_index, M, MP, COUNT_IN_KERNEL, LABEL_BLOCK)
    y = tl.load(labels_ptr + row.to(tl.int64) * s_y)
    valid = y != ignore_index
    lm = need & valid
    m, s_t, s_1, amax = _merge_stats(stats_ptr, amax_ptr, row, MP, NSPLIT, NSP, K_T, SAME_T)
    m_ref, s_t, s_1, w, w0, wsum = _settle_row(m, s_t, s_1, lm, w_kl, is_corr, w_lab, amax, y, valid)
    c_lo = k * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, C)
    X = _pass2_loop(logits_ptr + row.to(tl.int64) * s_b, node_off, lm, nmask, c_lo, c_hi, m_ref,
                    1.0 / s_t, 1.0 / s_1, w, w0, wsum, y, inv, grad_ptr + row.to(tl.int64) * C, gnode_off,
                    row < B, MP, BLOCK_C, WRITE_GRAD, T, K_T, SAME_T)
    xoff = (row.to(tl.int64) * NSPLIT + k) * (MP * MP) + nodes[:, None] * MP + nodes[None, :]
    tl.store(xbuf_ptr + xoff, X)


@triton.jit(do_not_specialize=["s_p"])
def _split_loss_kernel(
    logits_ptr, labels_ptr, gates_ptr, progress_ptr, count_ptr, stats_ptr, amax_ptr, xbuf_ptr,
    edge_ptr, node_ptr,
    B, C, s_m, s_b, s_y, s_p, ignore_index,
    M: tl.constexpr, MP: tl.constexpr, MP1: tl.constexpr, ROWS: tl.constexpr,
    NSPLIT: tl.constexpr, NSP: tl.constexpr,
    COUNT_IN_KERNEL: tl.constexpr, LABEL_BLOCK: tl.constexpr,
    T: tl.constexpr, K_T: tl.constexpr, SAME_T: tl.constexpr,
):
    """Losses of rows [pid*ROWS, (pid+1)*ROWS) from the chunks' stats and X."""
    pid = tl.program_id(0)
    nodes = tl.arange(0, MP)
    node_off = nodes.to(tl.int64) * s_m
    ks = tl.arange(0, NSP)
    w_kl, is_corr, w_lab, need, inv = _program_consts(gates_ptr, progress_ptr, s_p, tl.arange(0, MP), labels_ptr, count_ptr, B, s_y,
                                                      ignore_index, M, MP, COUNT_IN_KERNEL, LABEL_BLOCK)
    acc_kl = tl.zeros([MP, MP], tl.float32)
    acc_lab = tl.zeros([MP], tl.float32)
    for r in range(ROWS):
        row = tl.minimum(pid * ROWS + r, B - 1)  # clamped: rows past B read row B-1, then count as invalid
        row_ok = pid * ROWS + r < B
        y = tl.load(labels_ptr + row.to(tl.int64) * s_y)
        valid = row_ok & (y != ignore_index)
        lm = need & valid
        m, s_t, s_1, amax = _merge_stats(stats_ptr, amax_ptr, row, MP, NSPLIT, NSP, K_T, SAME_T)
        m_ref, s_t, s_1, w, w0, wsum = _settle_row(m, s_t, s_1, lm, w_kl, is_corr, w_lab, amax, y, valid)
        xoff = row.to(tl.int64) * (NSPLIT * MP * MP) + ks[:, None, None] * (MP * MP) \
            + nodes[None, :, None] * MP + nodes[None, None, :]
        X = tl.sum(tl.load(xbuf_ptr + xoff, mask=(ks < NSPLIT)[:, None, None], other=0.0), axis=0)
        row_ptr = logits_ptr + row.to(tl.int64) * s_b
        zy = _label_logits(row_ptr, node_off, y, C, lm, w0)
        edge_kl, edge_lab = _row_loss(X, m_ref, s_t, s_1, zy, w, w0, MP, T)
        acc_kl += edge_kl
        acc_lab += edge_lab
    _store_partials(edge_ptr, node_ptr, pid, acc_kl, acc_lab, inv, M, MP, MP1)
