"""Per-row building blocks of the graph-loss kernels (see SEMANTICS.md for the math).

Notation, per row n (sample) and node x (network node x+1 of the graph):
    z_x        logits, m_x = max_c z_x, d_x = z_x - m_x (<= 0)
    S_x        sum_c exp(d_x / T)      (temperature T)
    S1_x       sum_c exp(d_x)          (T = 1, the label edge)
    p_x        exp(d_x / T) / S_x,   q_x = exp(d_x) / S1_x
    X[s, t]    sum_c p_s * d_t       (an M x M matrix of dot products)

    KL(p_s || p_t) = (X[s, s] - X[s, t]) / T - log S_s + log S_t
    CE_t           = log S1_t + m_t - z_t[y]
    dL_t/dz_t      = inv * [ T * (wsum_t p_t - sum_s w_st p_s) + w0_t (q_t - onehot(y)) ]

with w_st the per-row gate weight of KL edge s -> t, w0_t that of the label edge,
wsum_t = sum_s w_st and inv = 1 / B_eff.  A linear gate's weight is the progress of
its destination t (one value for every edge, or one per destination node).  Centring
on each node's own max keeps every term bounded, so +-1e4 logits neither overflow nor
cancel badly.

Each row is read twice: pass 1 gathers (m, S, S1, argmax) online over blocks of
C; pass 2 (blocks in reverse order, so the most recently read ones are still in
L2) forms p, q, accumulates X and writes the gradient.  When C fits in one block
the tile is kept in registers and read once.  Tiles are [MP, BLOCK_C] with
MP = next_power_of_2(M): one program holds every node of its row(s), so the
M^2 edges of a row share one read of its logits.

Everything converts what it loads to float32 at once and stores gradients in the
gradient buffer's dtype; offsets are int64.  Masked classes (logits -inf) follow
0 * log 0 = 0, and a cutoff edge contributes exactly zero to loss and gradient
whatever its source holds (NaN or inf included).
"""
from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _gate_codes(gates_ptr, M: tl.constexpr, MP: tl.constexpr):
    """The (M+1, M+1) code matrix [source][destination]: KL codes [MP, MP], label codes [MP], needed nodes.

    need [MP]: the node is a source or a target of some edge (others are never read).
    """
    nodes = tl.arange(0, MP)
    nmask = nodes < M
    src = nodes[:, None]
    dst = nodes[None, :]
    kl_mask = nmask[:, None] & nmask[None, :] & (src != dst)
    code = tl.load(gates_ptr + (1 + src) * (M + 1) + (1 + dst), mask=kl_mask, other=0)
    code0 = tl.load(gates_ptr + 1 + nodes, mask=nmask, other=0)
    on = (code != 0).to(tl.int32)
    is_src = tl.max(on, axis=1) > 0
    is_tgt = (tl.max(on, axis=0) > 0) | (code0 != 0)
    need = (is_src | is_tgt) & nmask
    return code, code0, need


@triton.jit
def _gate_consts(gates_ptr, progress_ptr, s_p, pnode, M: tl.constexpr, MP: tl.constexpr):
    """Row-independent gate data from the code matrix and the linear gate's progress.

    progress_ptr[pnode[x] * s_p] is the progress of edges into node lane x (s_p = 0: one value for all;
    pnode: the lanes' node indices in the whole graph, tl.arange(0, MP) but in a block launch).
    Returns w_kl [MP, MP] (through/linear weight of KL edge s->t), is_corr [MP, MP] (KL edge
    gated by correct), w_lab [MP] (label-edge weight) and need [MP] (see _gate_codes).
    """
    code, code0, need = _gate_codes(gates_ptr, M, MP)
    nodes = tl.arange(0, MP)
    prog = tl.load(progress_ptr + pnode * s_p, mask=nodes < M, other=0.0).to(tl.float32)  # per destination
    # Codes: 0 cutoff, 1 through, 2 linear, 3 correct (ktg_fast.gates).
    w_kl = tl.where(code == 1, 1.0, 0.0) + tl.where(code == 2, prog[None, :], 0.0)
    is_corr = code == 3
    # On the label edge the source is always correct: correct acts as through.
    w_lab = tl.where((code0 == 1) | (code0 == 3), 1.0, 0.0) + tl.where(code0 == 2, prog, 0.0)
    return w_kl, is_corr, w_lab, need


@triton.jit
def _batch_inv(labels_ptr, count_ptr, B, s_y, ignore_index,
               COUNT_IN_KERNEL: tl.constexpr, LABEL_BLOCK: tl.constexpr):
    """1 / max(B_eff, 1): counted here from the labels (small B) or read from count_ptr."""
    if COUNT_IN_KERNEL:
        cnt = tl.zeros([LABEL_BLOCK], tl.int32)
        for b0 in range(0, B, LABEL_BLOCK):
            offs = b0 + tl.arange(0, LABEL_BLOCK)
            lab = tl.load(labels_ptr + offs.to(tl.int64) * s_y, mask=offs < B, other=ignore_index)
            cnt += (lab != ignore_index).to(tl.int32)
        n_valid = tl.sum(cnt, axis=0).to(tl.float32)
    else:
        n_valid = tl.load(count_ptr).to(tl.float32)
    return 1.0 / tl.maximum(n_valid, 1.0)


@triton.jit
def _program_consts(gates_ptr, progress_ptr, s_p, pnode, labels_ptr, count_ptr, B, s_y, ignore_index,
                    M: tl.constexpr, MP: tl.constexpr, COUNT_IN_KERNEL: tl.constexpr, LABEL_BLOCK: tl.constexpr):
    """What every program of every launch reads first: the gates' constants and 1 / max(B_eff, 1)."""
    w_kl, is_corr, w_lab, need = _gate_consts(gates_ptr, progress_ptr, s_p, pnode, M, MP)
    inv = _batch_inv(labels_ptr, count_ptr, B, s_y, ignore_index, COUNT_IN_KERNEL, LABEL_BLOCK)
    return w_kl, is_corr, w_lab, need, inv


@triton.jit
def _node_offsets(B, C, s_m, M: tl.constexpr, MP: tl.constexpr):
    """Node lanes 0..MP-1, their mask, and each node's offset into the logits (stride s_m) and into the
    contiguous (M, B, C) gradient."""
    nodes = tl.arange(0, MP)
    return nodes, nodes < M, nodes.to(tl.int64) * s_m, nodes.to(tl.int64) * B * C


@triton.jit
def _block_nodes(nodes_ptr, blk, M: tl.constexpr, MP: tl.constexpr, GATHER: tl.constexpr):
    """The whole-graph node index of each lane: nodes_ptr[blk, lane] for a block launch (GATHER), else
    the lane itself (int32)."""
    lanes = tl.arange(0, MP)
    if GATHER:
        return tl.load(nodes_ptr + blk * M + lanes, mask=lanes < M, other=0)
    return lanes


@triton.jit
def _stats_update(z, c0, m, s_t, s_1, amax, K_T: tl.constexpr, SAME_T: tl.constexpr):
    """Fold one [MP, BLOCK_C] block (masked entries -inf) into the online stats."""
    bmax = tl.max(z, axis=1)
    bidx = tl.argmax(z, axis=1, tie_break_left=True)
    # Strictly greater: ties keep the earlier block, like torch.argmax.
    amax = tl.where(bmax > m, c0 + bidx, amax)
    m_new = tl.maximum(m, bmax)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps -inf - -inf out
    d = z - m_ref[:, None]
    s_t = s_t * tl.exp2((m - m_ref) * K_T) + tl.sum(tl.exp2(d * K_T), axis=1)
    if SAME_T:
        s_1 = s_t
    else:
        s_1 = s_1 * tl.exp2((m - m_ref) * 1.4426950408889634) + tl.sum(tl.exp2(d * 1.4426950408889634), axis=1)
    return m_new, s_t, s_1, amax


@triton.jit
def _stats_pass(row_ptr, node_off, lm, c_lo, c_hi,
                MP: tl.constexpr, BLOCK_C: tl.constexpr, K_T: tl.constexpr, SAME_T: tl.constexpr):
    """Pass 1 over columns [c_lo, c_hi): raw max m (-inf if unread), S, S1, argmax."""
    m = tl.full([MP], float("-inf"), tl.float32)
    s_t = tl.zeros([MP], tl.float32)
    s_1 = tl.zeros([MP], tl.float32)
    amax = tl.zeros([MP], tl.int32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = lm[:, None] & (cols < c_hi)[None, :]
        z = tl.load(row_ptr + node_off[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m, s_t, s_1, amax = _stats_update(z, c0, m, s_t, s_1, amax, K_T, SAME_T)
    return m, s_t, s_1, amax


@triton.jit
def _row_weights(w_kl, is_corr, w_lab, amax, y, valid):
    """Per-row gate weights: w [MP, MP] (KL edges), w0 [MP] (label edges), wsum [MP]."""
    validf = valid.to(tl.float32)
    correct = amax == y
    w = (w_kl + tl.where(is_corr & correct[:, None], 1.0, 0.0)) * validf
    w0 = w_lab * validf
    wsum = tl.sum(w, axis=0)
    return w, w0, wsum


@triton.jit
def _settle_row(m, s_t, s_1, lm, w_kl, is_corr, w_lab, amax, y, valid):
    """A row's finished softmax stats (masked nodes made harmless: max 0, sums 1) and its gate weights."""
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    s_t = tl.where(lm, s_t, 1.0)
    s_1 = tl.where(lm, s_1, 1.0)
    w, w0, wsum = _row_weights(w_kl, is_corr, w_lab, amax, y, valid)
    return m_ref, s_t, s_1, w, w0, wsum


@triton.jit
def _pass2_block(z, cols, cmask, lm, nmask, m_ref, inv_st, inv_s1, w, w0, wsum, y, inv, X,
                 grow_ptr, gnode_off, row_ok,
                 WRITE_GRAD: tl.constexpr, T: tl.constexpr, K_T: tl.constexpr, SAME_T: tl.constexpr):
    """Pass 2 on one block: accumulate X and (optionally) store the gradient."""
    mask2 = lm[:, None] & cmask[None, :]
    d = tl.where(mask2, z - m_ref[:, None], 0.0)
    p = tl.where(mask2, tl.exp2(d * K_T) * inv_st[:, None], 0.0)
    # X[s, t] += sum_c p_s d_t.  A masked class (logit -inf) has p = 0 and d = -inf: clamping d to
    # the most negative float keeps 0 * log 0 = 0 (no NaN), while p_s > 0 against it stays huge.
    X += tl.sum(p[:, None, :] * tl.maximum(d, -3.0e38)[None, :, :], axis=2)
    if WRITE_GRAD:
        if SAME_T:
            q = p
        else:
            q = tl.where(mask2, tl.exp2(d * 1.4426950408889634) * inv_s1[:, None], 0.0)
        # mix[t, c] = sum_s w_st p_s; where(), not w * p: a cutoff edge (w = 0) from a source holding
        # NaN or inf must leave the target's gradient untouched (0 * NaN is NaN).
        mix = tl.sum(tl.where(w[:, :, None] != 0.0, w[:, :, None] * p[:, None, :], 0.0), axis=0)
        onehot = tl.where(cols[None, :] == y, 1.0, 0.0)
        g = (T * (wsum[:, None] * p - mix) + w0[:, None] * (q - onehot)) * inv
        smask = nmask[:, None] & cmask[None, :] & row_ok
        gptr = grow_ptr + gnode_off[:, None] + cols[None, :]
        tl.store(gptr, g.to(gptr.dtype.element_ty), mask=smask)
    return X


@triton.jit
def _pass2_loop(row_ptr, node_off, lm, nmask, c_lo, c_hi, m_ref, inv_st, inv_s1, w, w0, wsum, y, inv,
                grow_ptr, gnode_off, row_ok,
                MP: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_GRAD: tl.constexpr,
                T: tl.constexpr, K_T: tl.constexpr, SAME_T: tl.constexpr):
    """Pass 2 over columns [c_lo, c_hi), last block first (still in L2 after pass 1)."""
    X = tl.zeros([MP, MP], tl.float32)
    nblk = (c_hi - c_lo + BLOCK_C - 1) // BLOCK_C
    for i in range(0, nblk):
        c0 = c_lo + (nblk - 1 - i) * BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_hi
        z = tl.load(row_ptr + node_off[:, None] + cols[None, :], mask=lm[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        X = _pass2_block(z, cols, cmask, lm, nmask, m_ref, inv_st, inv_s1, w, w0, wsum, y, inv, X,
                         grow_ptr, gnode_off, row_ok, WRITE_GRAD, T, K_T, SAME_T)
    return X


@triton.jit
def _row_loss(X, m_ref, s_t, s_1, zy, w, w0, MP: tl.constexpr, T: tl.constexpr):
    """Weighted per-row losses (not yet divided by B_eff): kl [MP, MP] (s, t) and ce [MP] (t)."""
    nodes = tl.arange(0, MP)
    eye = nodes[:, None] == nodes[None, :]
    diag = tl.sum(tl.where(eye, X, 0.0), axis=1)
    log_s = tl.log(s_t)
    kl = (diag[:, None] - X) * (1.0 / T) - log_s[:, None] + log_s[None, :]
    # where(), not w * l: unread nodes may hold meaningless l (never inf/nan, but be safe).
    edge_kl = tl.where(w != 0.0, w * (T * T) * kl, 0.0)
    ce = tl.log(s_1) + m_ref - zy
    edge_lab = tl.where(w0 != 0.0, w0 * ce, 0.0)
    return edge_kl, edge_lab


@triton.jit
def _label_logits(row_ptr, node_off, y, C, lm, w0):
    """z_t[y] for the targets with a label edge on this row (0 elsewhere)."""
    y_safe = tl.minimum(tl.maximum(y, 0), C - 1).to(tl.int64)  # never read out of bounds
    return tl.load(row_ptr + node_off + y_safe, mask=lm & (w0 != 0.0), other=0.0).to(tl.float32)


@triton.jit
def _store_partials(edge_ptr, node_ptr, pid, acc_kl, acc_lab, inv,
                    M: tl.constexpr, MP: tl.constexpr, MP1: tl.constexpr):
    """Write this program's (M+1, M+1) edge and (M,) node partial sums, every entry."""
    nodes = tl.arange(0, MP)
    nmask = nodes < M
    base = edge_ptr + pid.to(tl.int64) * ((M + 1) * (M + 1))
    acc_kl = acc_kl * inv
    acc_lab = acc_lab * inv
    kl_ptr = base + (1 + nodes[:, None]) * (M + 1) + (1 + nodes[None, :])
    tl.store(kl_ptr, acc_kl, mask=nmask[:, None] & nmask[None, :])
    tl.store(base + 1 + nodes, acc_lab, mask=nmask)
    col0 = tl.arange(0, MP1)
    tl.store(base + col0 * (M + 1), tl.zeros([MP1], tl.float32), mask=col0 <= M)
    node_loss = tl.sum(acc_kl, axis=0) + acc_lab
    tl.store(node_ptr + pid.to(tl.int64) * M + nodes, node_loss, mask=nmask)
