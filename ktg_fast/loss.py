"""The graph loss: every edge of a knowledge transfer graph at once.

:func:`graph_loss` is the front door.  It dispatches to the fused Triton
kernel (``ktg_fast.kernels``) on CUDA tensors and to
:func:`graph_loss_reference`, a vectorised PyTorch implementation of
SEMANTICS.md, everywhere else.  The reference is the oracle every fast path is
tested against.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import torch

from . import gates as _gates
from .graph import check_gate_structure

__all__ = ["GraphLoss", "GraphLossResult", "graph_loss", "graph_loss_reference", "prepare_gates"]

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
        if logits.dim() < 3:
            raise ValueError(f"logits must be (M, *, C) (e.g. (M, B, C) or (M, B, T, C)) or a list of M (*, C) "
                             f"tensors, got shape {tuple(logits.shape)}")
        z = logits
    else:
        logits = list(logits)
        if not logits:
            raise ValueError("logits is an empty list: pass one (B, C) tensor per network node")
        if not all(isinstance(x, torch.Tensor) for x in logits):
            raise TypeError("logits must be tensors: an (M, B, C) tensor or a list of M (B, C) tensors")
        shapes = {tuple(x.shape) for x in logits}
        if len(shapes) != 1 or len(next(iter(shapes))) < 2:
            raise ValueError(f"every node's logits must be (*, C) of one shape, e.g. (B, C), got shapes {sorted(shapes)}")
        z = torch.stack(logits)
    if not z.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point (float32, float64, bfloat16 or float16), got {z.dtype}")
    return z


_LABEL_DTYPES = (torch.int64, torch.int32)


def _flatten(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, *, C) logits and (*) labels -> (M, B, C) and (B,), as F.cross_entropy users expect."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 or int32 tensor of class indices, got {type(labels).__name__}")
    lead = tuple(z.shape[1:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must be {lead} to match logits {tuple(z.shape)} (M, *, C), got {tuple(labels.shape)}")
    if z.dim() == 3:
        return z, labels
    return z.reshape(z.shape[0], -1, z.shape[-1]), labels.reshape(-1)


def _check_labels(labels: torch.Tensor, z: torch.Tensor, ignore_index: int) -> None:
    """Shape, dtype and (on the CPU, where it costs no synchronisation) range of the labels."""
    m, b, c = z.shape
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a ({b},) int64 or int32 tensor of class indices, got {type(labels).__name__}")
    if labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) to match logits {tuple(z.shape)}, got {tuple(labels.shape)}")
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= c))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index={ignore_index}; "
                             f"labels[{i}] is {int(labels[i])}")


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive finite number, got {temperature!r}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


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
    check_gate_structure(codes)
    return codes


def _progress_tensor(
    progress: Union[float, torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """progress as a 0-dim tensor; values outside [0, 1] (or NaN) are refused where it costs no sync.

    A float is always checked; a CPU tensor too; a CUDA tensor is not (it would synchronise every step).
    """
    if isinstance(progress, torch.Tensor):
        if progress.numel() != 1 or not progress.dtype.is_floating_point:
            raise ValueError(f"progress must be a float or a 0-dim floating-point tensor, got "
                             f"{progress.dtype} of shape {tuple(progress.shape)}")
        if progress.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_progress_value(float(progress))
        return progress.reshape(()).to(device=device, dtype=dtype)
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress must be a number in [0, 1] or a 0-dim tensor, got {progress!r}")
    _check_progress_value(float(progress))
    return torch.tensor(float(progress), device=device, dtype=dtype)


def _check_progress_value(v: float) -> None:
    if not 0.0 <= v <= 1.0:  # also false for NaN
        raise ValueError(f"progress (k / k_end of the linear gate) must lie in [0, 1], got {v!r}")


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
    codes = prepare_gates(gates, z.shape[0])
    z, labels = _flatten(z, labels)
    _check_labels(labels, z, ignore_index)
    t = _check_temperature(temperature)
    return _reference(z, labels, _edge_plan(codes), t, progress, ignore_index)


@dataclass(frozen=True)
class _EdgePlan:
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


def _edge_plan(codes: torch.Tensor) -> _EdgePlan:
    kinds = tuple(c for c in codes.unique().tolist() if c != _gates.CUTOFF)
    codes_kl = codes[1:, 1:]
    kl_targets = tuple((codes_kl != _gates.CUTOFF).any(dim=0).nonzero().flatten().tolist())
    kl_sources = tuple((codes_kl[:, list(kl_targets)] != _gates.CUTOFF).any(dim=1).nonzero().flatten().tolist()) \
        if kl_targets else ()
    ce_targets = tuple((codes[0, 1:] != _gates.CUTOFF).nonzero().flatten().tolist())
    return _EdgePlan(codes, tuple(map(tuple, codes.tolist())), kinds, any(c not in (_gates.THROUGH, _gates.LINEAR) for c in kinds), kl_targets,
                     kl_sources, ce_targets, all(c in _gates.KERNEL_GATES for c in kinds))


def _gate_weights(z: torch.Tensor, labels: torch.Tensor, plan: _EdgePlan, dtype: torch.dtype,
                  progress: Union[float, torch.Tensor], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample edge weights W[s, t, n] (gate weight / B_eff, 0 on ignored rows) and labels safe to gather."""
    m, b, _ = z.shape
    dev = z.device
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    n_valid = valid.sum().to(dtype)
    # An all-ignored batch yields zeros, not 0/0 = NaN.
    inv_b = valid.to(dtype) / n_valid.clamp(min=1.0)  # (B,) per-row weight 1/B_eff or 0
    prog = _progress_tensor(progress, dev, dtype)
    correct = None
    if plan.needs_correct:
        # The label source (row 0) is always correct.
        correct = torch.cat(
            [torch.ones(1, b, dtype=torch.bool, device=dev), z.detach().argmax(dim=-1) == labels.unsqueeze(0)]
        )
    ctx = _gates.GateContext(source_logits=z.detach(), labels=labels, progress=prog, correct=correct)
    weights = torch.zeros(m + 1, m + 1, b, dtype=dtype, device=dev)
    codes_dev = _cached_codes(plan.key, str(dev))  # cached: no host copy per step (CUDA-graph capturable)
    for code in plan.kinds:  # a loop over gate kinds (at most a handful), never over edges
        w = _gates.get_gate(code).weight(ctx)
        # A Python number becomes a device fill, not a host-to-device copy.
        w = torch.full((), float(w), dtype=dtype, device=dev) if not isinstance(w, torch.Tensor) else w.to(dev, dtype)
        w = torch.broadcast_to(w, (m + 1, b))
        weights = torch.where((codes_dev == code).unsqueeze(-1), w.unsqueeze(1), weights)
    return weights * inv_b, safe_labels  # the batch mean and the ignore mask folded into the weights


def _reference(z: torch.Tensor, labels: torch.Tensor, plan: _EdgePlan, t: float,
               progress: Union[float, torch.Tensor], ignore_index: int) -> GraphLossResult:
    """The reference on validated inputs (see :func:`graph_loss_reference`)."""
    m, b, c = z.shape
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    dev = z.device
    zf = z.to(dtype)
    labels = labels.to(dev)
    weights, safe_labels = _gate_weights(z, labels, plan, dtype, progress, ignore_index)

    edge = torch.zeros(m + 1, m + 1, dtype=dtype, device=dev)
    # Only targets with some non-cutoff KL input are computed: frozen nodes cost nothing.
    kl_targets, kl_sources = list(plan.kl_targets), list(plan.kl_sources)
    if kl_targets:
        # One log-softmax over every node that takes part (sources and targets share it; a contiguous
        # run of nodes is a view, not a copy).  Masked classes (logit -inf) are clamped to the most
        # negative float first: their p is exactly 0 and p log p = 0 (0 * log 0 = 0) with no NaN,
        # while p_s > 0 against a masked target class still makes a huge KL.
        used = sorted(set(kl_sources) | set(kl_targets))
        z_used = _take(zf, used)
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
        logp_s = _take(logp, [pos[n] for n in kl_sources]).detach()
        logp_t = _take(logp, [pos[n] for n in kl_targets])
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
        zt = _take(zf, ce_targets)
        n = len(ce_targets)
        # The fused log-softmax + NLL (a masked label class gives +inf, ignored rows 0).
        ce = torch.nn.functional.cross_entropy(zt.reshape(n * b, c), safe_labels.long().repeat(n),
                                               reduction="none").view(n, b)
        w_ce = weights[0, 1:][ce_targets]
        vals = torch.where(w_ce != 0, w_ce * ce, 0.0).sum(-1)
        edge = edge.index_put((_index_tensor((0,) * n, str(dev)),
                               _index_tensor(tuple(t + 1 for t in ce_targets), str(dev))), vals)

    return GraphLossResult(node_loss=edge[:, 1:].sum(0), edge_loss=edge)


def reference_with_grad(z: torch.Tensor, labels: torch.Tensor, plan: "_EdgePlan", temperature: float,
                        progress: Union[float, torch.Tensor], ignore_index: int
                        ) -> tuple[GraphLossResult, torch.Tensor]:
    """The reference losses and, in closed form, grad (M, B, C) = d(sum of node losses)/d logits.

    What the Triton kernel computes in one pass, in plain PyTorch ops (no autograd): SEMANTICS.md's
    dL_t/dz_t = T (sum_s w_st p_t - sum_s w_st p_s) + w_0t (q_t - onehot(y)), weights over B_eff.
    Used where the gradient must come with the forward (chunked losses) on devices without the
    kernel; float32 (float64 for float64 logits).  Inputs must be validated (``GraphLoss`` does).
    """
    with torch.no_grad():
        res = _reference(z, labels, plan, temperature, progress, ignore_index)
        m, b, c = z.shape
        dtype = res.edge_loss.dtype
        zf = z.to(dtype)
        labels = labels.to(z.device)
        weights, safe_labels = _gate_weights(z, labels, plan, dtype, progress, ignore_index)
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


def _take(x: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """``x[idx]`` along dim 0: a view when ``idx`` is a contiguous run (no copy, and a cheap backward)."""
    if list(idx) == list(range(idx[0], idx[0] + len(idx))):
        return x if len(idx) == x.shape[0] else x[idx[0]: idx[0] + len(idx)]
    return x[list(idx)]


@functools.lru_cache(maxsize=256)
def _index_tensor(idx: tuple, device: str) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _cached_codes(key: tuple, device: str) -> torch.Tensor:
    return torch.tensor(key, dtype=torch.int32, device=device)


# Devices on which the kernel failed to build or launch under impl="auto": they use the reference.
_KERNEL_BROKEN: dict[str, str] = {}


def _kernel_dtype_ok(z: torch.Tensor) -> bool:
    return z.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _kernel_device_ok(z: torch.Tensor) -> bool:
    """Whether impl="auto" tries the kernel on z's device: CUDA only (the interpreter is for tests)."""
    return z.is_cuda


def _warn_fallback(device: torch.device, cause: str) -> None:
    key = str(device)
    if key not in _KERNEL_BROKEN:
        _KERNEL_BROKEN[key] = cause
        warnings.warn(f"graph_loss: the fused Triton kernel is unavailable on {device} ({cause}); using the "
                      "PyTorch reference there (slower, same result). Pass impl='triton' to get the error instead.",
                      RuntimeWarning, stacklevel=3)


_IMPLS = ("auto", "triton", "reference")


def _check_impl(impl: str, plan: _EdgePlan) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "triton" and not plan.kernel_ok:
        raise ValueError("impl='triton' supports the built-in gates only; use impl='reference' for custom gates")


def _use_kernel(z: torch.Tensor, plan: _EdgePlan, impl: str) -> bool:
    if impl == "reference":
        return False
    kernel_ok = plan.kernel_ok  # impl="triton" with custom gates was refused when the loss was bound
    if impl == "triton":
        if z.dtype == torch.float64:
            raise TypeError("impl='triton' takes float32, bfloat16 or float16 logits; use impl='reference' for "
                            "float64")
        return True
    if not (kernel_ok and _kernel_device_ok(z) and _kernel_dtype_ok(z)) or str(z.device) in _KERNEL_BROKEN:
        return False
    try:
        from . import kernels  # local: needs Triton, may be absent; imported only when a kernel may run
    except ImportError as e:  # e.g. an un-installed checkout: kernels/ is installed as ktg_fast.kernels
        _warn_fallback(z.device, f"cannot import ktg_fast.kernels: {e}; install the package with pip install -e .")
        return False
    return kernels.is_available(z.device)


def _kernel_loss(z: torch.Tensor, labels: torch.Tensor, plan: "_EdgePlan", temperature: float,
                 progress: Union[float, torch.Tensor], ignore_index: int) -> GraphLossResult:
    from . import kernels  # local: optional Triton kernels (see _use_kernel)

    node, edge = kernels.graph_loss_triton(
        z, labels.to(z.device), _cached_codes(plan.key, str(z.device)), temperature,
        _progress_tensor(progress, z.device), int(ignore_index),
    )
    return GraphLossResult(node_loss=node, edge_loss=edge)


class GraphLoss(torch.nn.Module):
    """The graph loss bound to one gate matrix, temperature and implementation.

    Validates the gates once, derives which edges exist once, and keeps the
    gate codes on each device it meets; a call then only checks the batch.
    Training steps hold one; :func:`graph_loss` is a call through a fresh one.

    Args:
        gates: (M+1, M+1) gate matrix [source][destination] of gate names or
            integer codes (a nested list or an integer tensor); node 0 is the label.
        temperature: T of the KL edges, positive and finite (the label edge always uses T = 1).
        impl: "auto" (Triton kernel on CUDA, reference elsewhere; if the
            kernel cannot build or launch, the reference with one warning),
            "triton" (force the kernel, errors raised; on CPU only under
            TRITON_INTERPRET=1) or "reference".
        ignore_index: label value of rows to ignore.

    Raises:
        ValueError / KeyError / TypeError naming the gate, temperature or impl at fault.

    Semantics: docs/SEMANTICS.md (the paper's Eq. 1-3 with the gates of Sec. 3.2).
    """

    def __init__(self, gates: GatesLike, temperature: float = 1.0, *, impl: str = "auto", ignore_index: int = -100):
        super().__init__()
        codes = _gates.gate_codes(gates)
        self.plan = _edge_plan(prepare_gates(codes, codes.shape[0] - 1))
        self.temperature = _check_temperature(temperature)
        _check_impl(impl, self.plan)
        self.impl = impl
        self.ignore_index = int(ignore_index)

    @property
    def num_nodes(self) -> int:
        """M, the network nodes the gate matrix has (the label node excluded)."""
        return self.plan.num_nodes

    def forward(self, logits: LogitsLike, labels: torch.Tensor, progress: Union[float, torch.Tensor] = 1.0,
                *, check_finite: bool = False) -> GraphLossResult:
        """Losses of every node and edge for one batch.

        Args:
            logits: (M, *, C) stacked logits of network nodes 1..M, e.g. (M, B, C)
                or (M, B, T, C) for sequences, or a list of M (*, C) tensors
                (node order of the graph); float32, float64, bfloat16 or
                float16.  Masked classes may hold -inf (0 * log 0 = 0).
            labels: (*) int64 or int32 class labels; rows equal to
                ``ignore_index`` are left out of every edge and of the batch
                count.  A row whose label class has logit -inf gets an infinite
                cross-entropy.
            progress: k / k_end for linear gates in [0, 1], a float or a 0-dim
                tensor (a device tensor keeps CUDA-graph replays correct; its
                value is checked on the CPU only, never at the cost of a
                synchronisation).
            check_finite: raise ``FloatingPointError`` naming the node (and a
                masked label class, if that is the cause) when a node loss is
                not finite.  Costs one synchronisation; off by default.

        Returns:
            :class:`GraphLossResult`: ``node_loss`` (M,) and ``edge_loss``
            (M+1, M+1), float32 (float64 for float64 logits).

        Raises:
            ValueError / TypeError naming the argument: logits that do not match
            the gate matrix or are not floating point, labels of the wrong
            shape, dtype or (on the CPU) range, progress outside [0, 1].
        """
        z = _stack_logits(logits)
        if z.shape[0] != self.num_nodes:
            raise ValueError(f"logits hold {z.shape[0]} nodes but the gate matrix is "
                             f"{self.num_nodes + 1}x{self.num_nodes + 1}: it must be "
                             f"{z.shape[0] + 1}x{z.shape[0] + 1} (label node 0 plus one row per network)")
        z, labels = _flatten(z, labels)
        _check_labels(labels, z, self.ignore_index)
        plan, t, ii = self.plan, self.temperature, self.ignore_index
        if not _use_kernel(z, plan, self.impl):
            res = _reference(z, labels, plan, t, progress, ii)
        elif self.impl == "triton" or torch.compiler.is_compiling():
            res = _kernel_loss(z, labels, plan, t, progress, ii)
        else:
            try:
                res = _kernel_loss(z, labels, plan, t, progress, ii)
            except (ValueError, TypeError, torch.OutOfMemoryError):
                raise  # the caller's inputs or memory, not the kernel's build: the reference would not help
            except Exception as e:  # noqa: BLE001 - a Triton build or launch failure of any kind
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _warn_fallback(z.device, f"{type(e).__name__}: {first}")
                res = _reference(z, labels, plan, t, progress, ii)
        if check_finite:
            _raise_if_not_finite(res, z, labels, ii)
        return res

    def loss_and_grad(self, logits: torch.Tensor, labels: torch.Tensor, progress: Union[float, torch.Tensor] = 1.0
                      ) -> tuple[GraphLossResult, torch.Tensor]:
        """Losses and grad = d(sum of node losses)/d(logits), computed together, without autograd.

        The fused kernel writes the gradient during its forward anyway; elsewhere the reference
        computes it in closed form (:func:`reference_with_grad`).  For callers that turn it into
        other gradients themselves (:class:`~ktg_fast.linear_loss.GraphLinearLoss`).

        Args:
            logits: (M, B, C) floating-point logits (not flattened here).
            labels: (B,) int64 or int32 labels.
            progress: as in :meth:`forward`.

        Returns:
            (:class:`GraphLossResult`, grad (M, B, C)): grad in float32 for 16-bit logits on the
            reference path and for float16 on the kernel's, else in the logits' dtype (float64 stays).
        """
        z = _stack_logits(logits)
        if z.dim() != 3 or z.shape[0] != self.num_nodes:
            raise ValueError(f"logits must be ({self.num_nodes}, B, C), got {tuple(z.shape)}")
        _check_labels(labels, z, self.ignore_index)
        plan, t, ii = self.plan, self.temperature, self.ignore_index
        if _use_kernel(z, plan, self.impl):
            from . import kernels  # local: optional Triton kernels (see _use_kernel)

            def run():
                node, edge, grad = kernels.graph_loss_triton_with_grad(
                    z, labels.to(z.device), _cached_codes(plan.key, str(z.device)), t,
                    _progress_tensor(progress, z.device), ii)
                return GraphLossResult(node, edge), grad

            if self.impl == "triton" or torch.compiler.is_compiling():
                return run()
            try:
                return run()
            except (ValueError, TypeError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # noqa: BLE001 - a Triton build or launch failure of any kind
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _warn_fallback(z.device, f"{type(e).__name__}: {first}")
        return reference_with_grad(z.detach(), labels, plan, t, progress, ii)

    def extra_repr(self) -> str:
        return f"num_nodes={self.num_nodes}, temperature={self.temperature}, impl={self.impl!r}"


def graph_loss(
    logits: LogitsLike,
    labels: torch.Tensor,
    gates: GatesLike,
    *,
    temperature: float = 1.0,
    progress: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    check_finite: bool = False,
) -> GraphLossResult:
    """Losses of every node and edge of a knowledge transfer graph for one batch.

    A call through ``GraphLoss(gates, temperature, impl=impl, ignore_index=ignore_index)``;
    code that calls it every step should hold a :class:`GraphLoss` instead (the
    gate matrix is then validated once).  Arguments, results and errors are
    :class:`GraphLoss`'s and its ``forward``'s.

    Semantics: docs/SEMANTICS.md (the paper's Eq. 1-3 with the gates of Sec. 3.2).
    """
    z = _stack_logits(logits)
    codes = prepare_gates(gates, z.shape[0])
    loss = GraphLoss(codes, temperature, impl=impl, ignore_index=ignore_index)
    return loss(z, labels, progress, check_finite=check_finite)


def _raise_if_not_finite(res: GraphLossResult, z: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    bad = (~torch.isfinite(res.node_loss.detach())).nonzero().flatten().tolist()
    if not bad:
        return
    t = bad[0] + 1
    msg = f"graph_loss: the loss of node {t} is {float(res.node_loss[t - 1])}"
    rows = labels != ignore_index
    safe = torch.where(rows, labels, torch.zeros_like(labels)).long().to(z.device)
    at_label = z[t - 1].detach().gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    masked = (rows.to(z.device) & (at_label == float("-inf"))).nonzero().flatten().tolist()
    if masked:
        r = masked[0]
        msg += (f": row {r}'s label {int(labels[r])} is a masked class (logit -inf) of node {t}, so its "
                "cross-entropy is infinite; mask such rows with ignore_index or leave the label class unmasked")
    elif not bool(torch.isfinite(z[t - 1].detach()).all()):
        msg += f": node {t}'s logits hold NaN or inf"
    raise FloatingPointError(msg)
