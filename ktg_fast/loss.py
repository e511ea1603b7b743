"""The graph loss: every edge of a knowledge transfer graph at once.

:class:`GraphLoss` is the front door: bound once to a gate matrix, a temperature and an
implementation, it runs the fused Triton kernel (``ktg_fast.kernels``) on CUDA tensors and the
vectorised reference (:mod:`ktg_fast.reference`) everywhere else; :func:`graph_loss` is a call
through a fresh one.  Inputs are checked in :mod:`ktg_fast.loss_inputs`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch

from . import gates as _gates
from .loss_inputs import (GatesLike, GraphLossResult, LogitsLike, check_labels, check_temperature, flatten_batch,
                          gates_and_temperature, prepare_gates, progress_tensor, stack_logits)
from .live_gates import LiveGates, kernel_node_limit
from .loss_blocks import block_key, node_blocks, run_in_blocks
from .reference import (EdgePlan, cached_codes, edge_plan, graph_loss_reference, live_plan, reference_loss,
                        reference_with_grad)

__all__ = ["GraphLoss", "GraphLossResult", "graph_loss", "graph_loss_reference", "prepare_gates"]

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


def _check_impl(impl: str, plan: EdgePlan) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "triton" and not plan.kernel_ok:
        raise ValueError("impl='triton' supports the built-in gates only; use impl='reference' for custom gates")


def _use_kernel(z: torch.Tensor, plan: EdgePlan, impl: str) -> bool:
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
    if plan.live is not None and not plan.live.kernel_fits:
        return False  # a block beyond the kernel's limit
    if plan.live is None and plan.num_nodes > kernels.MAX_NODES and node_blocks(plan.key, kernels.MAX_NODES) is None:
        return False  # a connected graph beyond the kernel's limit: the reference has none
    return kernels.is_available(z.device)


def _launch(z: torch.Tensor, plan: EdgePlan, p: torch.Tensor, kernel, blocks_kernel) -> tuple[torch.Tensor, ...]:
    """``kernel(z, codes, progress)`` in one launch, or per block of nodes beyond the kernel's node limit
    (:mod:`ktg_fast.loss_blocks`), with the gate codes kept on z's device (no per-step copies); gates set
    in place in blocks of one size: ``blocks_kernel(z, block_codes, block_nodes, progress)``, one launch."""
    from . import kernels  # local: optional Triton kernels (see _use_kernel)

    dev, live = str(z.device), plan.live
    if live is not None:
        if not live.kernel_fits:
            raise ValueError(f"the Triton kernel takes at most {kernels.MAX_NODES} network nodes per block, and "
                             f"blocks {list(live.blocks)} hold more; use impl='reference' (or 'auto', which does)")
        if live.uniform:
            return blocks_kernel(z, live.block_codes, live.block_nodes, p)
        if live.launches is None:
            return kernel(z, live.codes, p)
        return run_in_blocks(z, live.launch_codes, p, live.launches, kernel)
    if plan.num_nodes <= kernels.MAX_NODES:
        return kernel(z, cached_codes(plan.key, dev), p)
    blocks = node_blocks(plan.key, kernels.MAX_NODES)
    if blocks is None:
        raise ValueError(f"the Triton kernel takes at most {kernels.MAX_NODES} connected network nodes, and this "
                         f"{plan.num_nodes}-node graph has a larger set of nodes joined by edges; use "
                         "impl='reference' (or 'auto', which does)")
    return run_in_blocks(z, [cached_codes(block_key(plan.key, a, b), dev) for a, b in blocks], p, blocks, kernel)


def _kernel_loss(z: torch.Tensor, labels: torch.Tensor, plan: "EdgePlan", temperature: float,
                 progress: Union[float, torch.Tensor], ignore_index: int) -> GraphLossResult:
    from . import kernels  # local: optional Triton kernels (see _use_kernel)

    labels, p = labels.to(z.device), progress_tensor(progress, z.shape[0], z.device)
    node, edge = _launch(z, plan, p,
                         lambda zb, cb, pb: kernels.graph_loss_triton(zb, labels, cb, temperature, pb, int(ignore_index)),
                         lambda zb, bc, bn, pb: kernels.graph_loss_triton_blocks(zb, labels, bc, bn, temperature, pb,
                                                                                 int(ignore_index)))
    return GraphLossResult(node_loss=node, edge_loss=edge)


class GraphLoss(torch.nn.Module):
    """The graph loss bound to one gate matrix, temperature and implementation.

    Validates the gates once, derives which edges exist once, and keeps the
    gate codes on each device it meets; a call then only checks the batch.
    Training steps hold one; :func:`graph_loss` is a call through a fresh one.

    Args:
        gates: (M+1, M+1) gate matrix [source][destination] of gate names or
            integer codes (a nested list or an integer tensor); node 0 is the label. Or a
            :class:`~ktg_fast.graph.Graph` (``kf.preset("kd")``, a graph file's): its gates and temperature.
        temperature: T of the KL edges, positive and finite (the label edge always uses T = 1); None:
            the Graph's, or 1.0 for a gate matrix.
        impl: "auto" (Triton kernel on CUDA, reference elsewhere; if the
            kernel cannot build or launch, the reference with one warning),
            "triton" (force the kernel, errors raised; on CPU only under
            TRITON_INTERPRET=1) or "reference".
        ignore_index: label value of rows to ignore.
        blocks: gates set in place (a trial pack's node places, :mod:`ktg_fast.live_gates`): 0-based node
            ranges ``(start, stop)`` tiling the nodes, edges only inside a block, built-in gates only.
            Every edge a block may hold is computed, its gate read at run time, so :meth:`set_gates`
            neither reallocates nor makes ``torch.compile`` recompile or a CUDA graph re-capture.
        device: where the logits will be, with ``blocks`` (the gates live there).

    Raises:
        ValueError / KeyError / TypeError naming the gate, temperature, impl or block at fault.

    Semantics: docs/SEMANTICS.md (the paper's Eq. 1-3 with the gates of Sec. 3.2).
    """

    def __init__(self, gates: GatesLike, temperature: Optional[float] = None, *, impl: str = "auto",
                 ignore_index: int = -100, blocks: Optional[Sequence[tuple[int, int]]] = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        from .device import resolve_device

        resolve_device(device)  # an unknown device, or CUDA where there is none, is refused here, not ignored
        gates, temperature = gates_and_temperature(gates, temperature)
        codes = _gates.gate_codes(gates)
        if blocks is None:
            self.plan = edge_plan(prepare_gates(codes, codes.shape[0] - 1))
        else:
            self.plan = live_plan(LiveGates(codes, blocks, device, kernel_limit=kernel_node_limit()))
        self.temperature = check_temperature(temperature)
        _check_impl(impl, self.plan)
        self.impl = impl
        self.ignore_index = int(ignore_index)

    @property
    def num_nodes(self) -> int:
        """M, the network nodes the gate matrix has (the label node excluded)."""
        return self.plan.num_nodes

    def set_gates(self, gates: GatesLike, groups: Optional[Sequence[Sequence[int]]] = None) -> None:
        """Rewrite the gate matrix in place (a loss built with ``blocks``): a pack's newcomer trial.

        Args:
            gates: (M+1, M+1) gate names or codes, built-in gates only, no edge between blocks.
            groups: blocks of one size only: the nodes of each block anew (NB lists of m 0-based nodes,
                every node once; a newcomer's nodes need not be contiguous); None keeps them.

        Raises:
            RuntimeError: a loss built without ``blocks`` (its edges are fixed; build a new one).
            ValueError: what :meth:`ktg_fast.live_gates.LiveGates.set` refuses, named.
        """
        if self.plan.live is None:
            raise RuntimeError("this GraphLoss was bound to fixed gates; build it with blocks=... to set gates "
                               "in place, or build a new GraphLoss")
        self.plan.live.set(gates, groups)

    @property
    def gate_key(self) -> tuple[tuple[int, ...], ...]:
        """The gate codes in use, as nested tuples [source][destination]."""
        return self.plan.key if self.plan.live is None else self.plan.live.key

    def forward(self, logits: LogitsLike, labels: torch.Tensor, progress: Union[float, torch.Tensor] = 1.0,
                *, check_finite: bool = False) -> GraphLossResult:
        """Losses of every node and edge for one batch.

        Args:
            logits: (M, *, C) stacked logits of network nodes 1..M, e.g. (M, B, C)
                or (M, B, T, C) for sequences, or a list of M (*, C) tensors
                (node order of the graph); float32, float64, bfloat16 or
                float16.  Masked classes may hold -inf (0 * log 0 = 0).
            labels: (*) int64 or int32 class labels on the logits' device; rows
                equal to ``ignore_index`` are left out of every edge and of the
                batch count (no counted row, or no row at all: every loss is 0,
                with zero gradients).  A row whose label class has logit -inf
                gets an infinite cross-entropy.
            progress: k / k_end for linear gates in [0, 1]: a float or a 0-dim
                tensor (every linear edge), or an (M,) tensor, one value per
                destination node (edges s -> t weigh progress[t-1]; trials packed
                into one graph, each at its own step).  A device tensor keeps
                CUDA-graph replays correct and new values cause no recompile;
                values are checked on the CPU only, never at the cost of a
                synchronisation.
            check_finite: raise ``FloatingPointError`` naming the node (and a
                masked label class, if that is the cause) when a node loss is
                not finite.  Costs one synchronisation; off by default.

        Returns:
            :class:`GraphLossResult`: ``node_loss`` (M,) and ``edge_loss``
            (M+1, M+1), float32 (float64 for float64 logits).  ``node_loss``
            backpropagates whenever the logits require grad, also when every
            gate is cutoff (exact zeros, zero gradients).

        Raises:
            ValueError / TypeError naming the argument: logits that do not match
            the gate matrix, have no row dimension (a (C,) row: pass
            ``z.unsqueeze(0)``) or are not floating point, labels of the wrong
            shape, dtype, device or (on the CPU) range, progress outside [0, 1]
            or of a shape other than () or (M,).
        """
        z = stack_logits(logits)
        if z.shape[0] != self.num_nodes:
            raise ValueError(f"logits hold {z.shape[0]} nodes but the gate matrix is "
                             f"{self.num_nodes + 1}x{self.num_nodes + 1}: it must be "
                             f"{z.shape[0] + 1}x{z.shape[0] + 1} (label node 0 plus one row per network)")
        z, labels = flatten_batch(z, labels)
        check_labels(labels, z, self.ignore_index)
        plan, t, ii = self.plan, self.temperature, self.ignore_index
        _check_live_device(plan, z)
        if not _use_kernel(z, plan, self.impl):
            res = reference_loss(z, labels, plan, t, progress, ii)
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
                res = reference_loss(z, labels, plan, t, progress, ii)
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
            labels: (B,) int64 or int32 labels on the logits' device.
            progress: as in :meth:`forward`.

        Returns:
            (:class:`GraphLossResult`, grad (M, B, C)): grad in float32 for 16-bit logits on the
            reference path and for float16 on the kernel's, else in the logits' dtype (float64 stays).
        """
        z = stack_logits(logits)
        if z.dim() != 3 or z.shape[0] != self.num_nodes:
            raise ValueError(f"logits must be ({self.num_nodes}, B, C), got {tuple(z.shape)}")
        check_labels(labels, z, self.ignore_index)
        plan, t, ii = self.plan, self.temperature, self.ignore_index
        _check_live_device(plan, z)
        if _use_kernel(z, plan, self.impl):
            from . import kernels  # local: optional Triton kernels (see _use_kernel)

            def run():
                y, p = labels.to(z.device), progress_tensor(progress, z.shape[0], z.device)
                node, edge, grad = _launch(
                    z, plan, p, lambda zb, cb, pb: kernels.graph_loss_triton_with_grad(zb, y, cb, t, pb, ii),
                    lambda zb, bc, bn, pb: kernels.graph_loss_triton_blocks_with_grad(zb, y, bc, bn, t, pb, ii))
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
        live = "" if self.plan.live is None else f", blocks={list(self.plan.live.blocks)}"
        if self.plan.live is not None and self.plan.live.groups != tuple(tuple(range(a, b))
                                                                          for a, b in self.plan.live.blocks):
            live += f", groups={[list(g) for g in self.plan.live.groups]}"
        return f"num_nodes={self.num_nodes}, temperature={self.temperature}, impl={self.impl!r}{live}"


def _check_live_device(plan: EdgePlan, z: torch.Tensor) -> None:
    if plan.live is not None and z.device != plan.live.device:
        raise ValueError(f"logits on {z.device}, but this GraphLoss keeps its gates on {plan.live.device}; build it "
                         f"with device={str(z.device)!r}")


def graph_loss(
    logits: LogitsLike,
    labels: torch.Tensor,
    gates: GatesLike,
    *,
    temperature: Optional[float] = None,
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
    z = stack_logits(logits)
    gates, temperature = gates_and_temperature(gates, temperature)
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
    else:  # -inf is a masked class, allowed; NaN or +inf is a diverged node, maybe one node t learns from
        zd = z.detach()
        broken = [m + 1 for m in range(zd.shape[0]) if bool((torch.isnan(zd[m]) | (zd[m] == float("inf"))).any())]
        if broken:
            which = ", ".join(map(str, broken))
            msg += f": the logits of node{'s' if len(broken) > 1 else ''} {which} hold NaN or +inf"
            if t not in broken:
                msg += f" (node {t} learns from {'them' if len(broken) > 1 else 'it'})"
    raise FloatingPointError(msg)
