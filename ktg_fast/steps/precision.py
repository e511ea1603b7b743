"""Mixed precision for the step paths: autocast forwards, fp32 losses and weights, per-node fp16 loss scales.

``precision`` is one of :data:`PRECISIONS`:

- ``fp32``: everything in float32 (the reference);
- ``bf16``: the nets' forwards (and so their backwards) under ``torch.autocast`` in bfloat16;
  bfloat16 has float32's exponent range, so no loss scaling;
- ``fp16``: the same in float16, with a loss scale per node (:class:`NodeLossScale`): a node
  whose gradients overflow skips its own update and halves its own scale, the others step.

In every mode the graph loss runs outside autocast and accumulates in float32
(:class:`~ktg_fast.loss.GraphLoss` casts 16-bit logits up; the Triton kernel reads them as they
are), and parameters, optimizer state and checkpoints stay float32.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Sequence

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "check_precision", "default_precision", "forward_autocast", "precision_warning",
           "NodeLossScale", "check_loss_scale_state"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: any other value (the message lists the choices).
    """
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The forward's autocast dtype: None for fp32, else bfloat16 / float16."""
    return _DTYPES[check_precision(precision)]


def default_precision(device: torch.device | str) -> str:
    """What a run should use when the user does not say: bf16 on a CUDA device that supports it, else fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def precision_warning(device: torch.device | str, precision: str) -> Optional[str]:
    """Why ``precision`` will be slow on ``device``, or None.  fp16 on the CPU: most processors have no fast
    fp16 kernels, so autocast's float16 convolutions fall back to slow code (a new user saw 10-25x fp32's time)."""
    if torch.device(device).type == "cpu" and precision == "fp16":
        return ("--precision fp16 on the CPU is usually many times slower than fp32 (no fast float16 kernels on "
                "most processors): use bf16 (fast on CPUs with AVX512-BF16 or AMX) or fp32")
    return None


def forward_autocast(device: torch.device, precision: str) -> ContextManager:
    """``torch.autocast`` for the nets' forward in ``precision`` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class NodeLossScale:
    """A dynamic loss scale per network node, held on the device (``torch.amp.GradScaler``'s rules, per node).

    Node t's loss is multiplied by ``scale[t-1]`` before the backward, so its
    gradients (which reach only its own parameters) are scaled by it too.  After
    the backward :meth:`unscale_and_check` divides each node's gradients by its
    scale and says which nodes have only finite gradients; :meth:`update` then
    halves the scale of each node that overflowed and doubles that of a node
    after ``growth_interval`` clean steps in a row.  Everything is tensor ops
    without a host synchronisation (capturable and compilable).

    Args:
        num_nodes: M network nodes.
        device: where the scales live.
        init_scale, growth_factor, backoff_factor, growth_interval: as ``torch.amp.GradScaler``.
    """

    def __init__(self, num_nodes: int, device: torch.device, *, init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((num_nodes,), float(init_scale), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(num_nodes, dtype=torch.int32, device=device)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)

    def scaled_total(self, node_loss: torch.Tensor) -> torch.Tensor:
        """(M,) float32 node losses -> the scalar to differentiate: sum_t scale_t * L_t."""
        return (node_loss * self.scale).sum()

    @torch.no_grad()
    def unscale_and_check(self, node_index: torch.Tensor, flats: Sequence) -> torch.Tensor:
        """Unscale one node group's flat gradients in place; return (K,) bool: node slot has finite gradients.

        Args:
            node_index: (K,) int64, the 0-based graph node of each slot of the group.
            flats: the group's flat buffers (``grad`` (N,) and ``node_of`` (N,) int64 slot of each element).
        """
        inv = self.scale.index_select(0, node_index).reciprocal()  # scales are powers of 2: exact
        bad = torch.zeros(node_index.shape[0], dtype=torch.float32, device=inv.device)
        for f in flats:
            f.grad.mul_(inv.to(f.grad.dtype).index_select(0, f.node_of))
            bad.index_add_(0, f.node_of, (~torch.isfinite(f.grad)).to(torch.float32))
        return bad == 0

    @torch.no_grad()
    def update(self, node_index: torch.Tensor, ok: torch.Tensor) -> None:
        """Back off the scale of the group's nodes that overflowed (``ok`` False), grow it after clean runs."""
        scale = self.scale.index_select(0, node_index)
        tracker = self.growth_tracker.index_select(0, node_index)
        tracker = torch.where(ok, tracker + 1, torch.zeros_like(tracker))
        grow = tracker >= self.growth_interval
        scale = torch.where(ok, torch.where(grow, scale * self.growth_factor, scale), scale * self.backoff_factor)
        tracker = torch.where(grow, torch.zeros_like(tracker), tracker)
        self.scale.index_copy_(0, node_index, scale)
        self.growth_tracker.index_copy_(0, node_index, tracker)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"scale": (M,) float32, "growth_tracker": (M,) int32}``, copied to the CPU."""
        return {"scale": self.scale.detach().cpu().clone(), "growth_tracker": self.growth_tracker.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output in place (captured CUDA graphs keep reading these tensors).

        Raises:
            ValueError: ``state`` does not hold one scale and one growth tracker per node.
        """
        check_loss_scale_state(state, self.scale.shape[0])
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def check_loss_scale_state(state: object, num_nodes: int) -> None:
    """Check that ``state`` is a loss-scale state of ``num_nodes`` nodes (see :meth:`NodeLossScale.state_dict`).

    Raises:
        ValueError: anything else (the message says what is off).
    """
    if not isinstance(state, dict) or any(k not in state for k in ("scale", "growth_tracker")):
        raise ValueError("the loss-scale state lacks 'scale' or 'growth_tracker'")
    for key in ("scale", "growth_tracker"):
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (num_nodes,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"the loss-scale {key} is {shape}, not one value for each of {num_nodes} nodes")
