"""What a run measures: one epoch's running losses, accuracies and first non-finite step (kept on the
device, read once per check), and every node's accuracy on an evaluation split."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

import torch

from .steps import TrainStep

if TYPE_CHECKING:
    from .distributed import DistContext

__all__ = ["EpochStats", "evaluate_nodes"]


class EpochStats:
    """Sums over one epoch's training batches, accumulated on ``device`` without a host synchronisation.

    Args:
        num_nodes: M network nodes.
        device: where the batches' losses and logits are.
    """

    def __init__(self, num_nodes: int, device: torch.device):
        self.loss_sum = torch.zeros(num_nodes, dtype=torch.float64, device=device)
        self.correct = torch.zeros(num_nodes, dtype=torch.long, device=device)
        # Each node's first non-finite step (-1: none): per node, so that a pack tells each member its own.
        self.bad_step = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
        self.seen = 0

    def add(self, step: int, node_loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one batch: node losses (M,), logits (M, B, C), labels (B,) of optimizer step ``step``."""
        first = (self.bad_step < 0) & ~torch.isfinite(node_loss)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.loss_sum += node_loss.double()
        self.correct += (logits.argmax(-1) == y.unsqueeze(0)).sum(-1)
        self.seen += y.shape[0]

    def reduce_(self, dist: Optional["DistContext"]) -> None:
        """Sum the counts over the ranks of a data-parallel run (losses are global already)."""
        if dist is None:
            return
        seen = torch.tensor([self.seen], dtype=torch.long, device=self.correct.device)
        dist.all_reduce_(self.correct)
        self.seen = int(dist.all_reduce_(seen))

    def first_non_finite(self, places: Optional[list[int]] = None) -> Optional[tuple[int, list[int]]]:
        """(step, 1-based nodes) of the first step with a non-finite node loss, or None (reads the device).

        ``places``: only these 1-based nodes (a pack member's), default all; the nodes returned are among them.
        """
        steps = self.bad_step.tolist()
        picked = [(t, steps[t - 1]) for t in (places or range(1, len(steps) + 1)) if steps[t - 1] >= 0]
        if not picked:
            return None
        k = min(s for _, s in picked)
        return k, [t for t, s in picked if s == k]

    def mean_loss(self, batches: int) -> list[float]:
        """Each node's mean training loss over ``batches`` batches."""
        return (self.loss_sum / max(batches, 1)).tolist()

    def accuracy(self) -> list[float]:
        """Each node's top-1 training accuracy (%) over the batches counted."""
        return (self.correct.double() * 100.0 / max(self.seen, 1)).tolist()


@torch.no_grad()
def evaluate_nodes(train_step: TrainStep, loader: Iterable, num_nodes: int, device: torch.device,
                   dist: Optional["DistContext"] = None) -> list[float]:
    """Top-1 accuracy (%) of every node on ``loader``'s batches, in eval mode.

    With ``dist`` each rank evaluates its shard (every image once) and the counts are summed over the ranks.
    """
    correct = torch.zeros(num_nodes + 1, dtype=torch.long, device=device)  # the last entry counts the images
    for x, y in loader:
        logits = train_step.eval_logits(x)
        correct[:num_nodes] += (logits.argmax(-1) == y.unsqueeze(0)).sum(-1)
        correct[num_nodes] += y.shape[0]
    if dist is not None:
        dist.all_reduce_(correct)
    total = int(correct[num_nodes])
    return (correct[:num_nodes].double() * 100.0 / max(total, 1)).tolist()
