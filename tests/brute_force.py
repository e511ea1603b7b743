"""A brute-force graph loss written line by line from SEMANTICS.md: the oracle's oracle.

Loops over every edge and every sample in float64; slow and obvious on purpose.
"""

import torch

CUTOFF, THROUGH, LINEAR, CORRECT = "cutoff", "through", "linear", "correct"


def progress_of(progress, t):
    """The linear gate's weight on edges into node t (1-based): one number for every edge, or
    ``progress[t-1]`` of a per-destination sequence / (M,) tensor (SEMANTICS.md)."""
    if isinstance(progress, (int, float)):
        return float(progress)
    if isinstance(progress, torch.Tensor) and progress.numel() == 1:
        return float(progress)
    return float(progress[t - 1])


def brute_force_graph_loss(logits, labels, gates, temperature, progress, ignore_index=-100):
    """Return (node_loss (M,), edge_loss (M+1, M+1)) as float64 tensors with autograd to ``logits``.

    ``logits`` is a list of M (B, C) float64 tensors; ``gates`` a nested list of names; ``progress``
    a number, or one per destination node (a list or an (M,) tensor: edges s -> t weigh progress[t-1]).
    """
    m = len(logits)
    b = logits[0].shape[0]
    rows = [n for n in range(b) if int(labels[n]) != ignore_index]
    b_eff = len(rows)
    T = float(temperature)
    edge = [[torch.zeros((), dtype=torch.float64) for _ in range(m + 1)] for _ in range(m + 1)]
    for t in range(1, m + 1):
        zt = logits[t - 1]
        for s in range(m + 1):
            g = gates[s][t]
            if s == t or g == CUTOFF:
                continue
            total = torch.zeros((), dtype=torch.float64)
            for n in rows:
                y = int(labels[n])
                if s == 0:
                    w = progress_of(progress, t) if g == LINEAR else 1.0  # correct acts as through on the label edge
                    l = -torch.log_softmax(zt[n], dim=0)[y]
                else:
                    zs = logits[s - 1][n].detach()
                    if g == THROUGH:
                        w = 1.0
                    elif g == LINEAR:
                        w = progress_of(progress, t)
                    elif g == CORRECT:
                        w = 1.0 if int(torch.argmax(zs)) == y else 0.0
                    else:
                        raise ValueError(g)
                    ps = torch.softmax(zs / T, dim=0)
                    log_pt = torch.log_softmax(zt[n] / T, dim=0)
                    # 0 * log 0 = 0: a masked class (logit -inf) of the source contributes nothing.
                    l = T * T * torch.sum(torch.where(ps > 0, ps * (torch.log(ps) - log_pt), 0.0))
                total = total + w * l
            edge[s][t] = total / b_eff if b_eff else total * 0
    edge_t = torch.stack([torch.stack(r) for r in edge])
    return edge_t[:, 1:].sum(0), edge_t


def analytic_grad(logits, labels, gates, temperature, progress, ignore_index=-100):
    """dL_t/dz_t from SEMANTICS.md's closed form, for every node t (a list of (B, C))."""
    m = len(logits)
    b, c = logits[0].shape
    valid = [int(labels[n]) != ignore_index for n in range(b)]
    b_eff = max(sum(valid), 1)
    T = float(temperature)
    grads = []
    for t in range(1, m + 1):
        zt = logits[t - 1].detach()
        g_t = torch.zeros(b, c, dtype=torch.float64)
        for n in range(b):
            if not valid[n]:
                continue
            y = int(labels[n])
            pt = torch.softmax(zt[n] / T, 0)
            for s in range(m + 1):
                g = gates[s][t]
                if s == t or g == CUTOFF:
                    continue
                if s == 0:
                    w = progress_of(progress, t) if g == LINEAR else 1.0
                    onehot = torch.zeros(c, dtype=torch.float64)
                    onehot[y] = 1
                    g_t[n] += w * (torch.softmax(zt[n], 0) - onehot)
                else:
                    zs = logits[s - 1][n].detach()
                    w = {THROUGH: 1.0, LINEAR: progress_of(progress, t)}.get(g, None)
                    if w is None:
                        w = 1.0 if int(torch.argmax(zs)) == y else 0.0
                    g_t[n] += w * T * (pt - torch.softmax(zs / T, 0))
        grads.append(g_t / b_eff)
    return grads
