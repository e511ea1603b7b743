"""The paper's training recipe as overridable defaults (docs/SEMANTICS.md, "Training recipe").

SGD with Nesterov momentum 0.9, learning rate 0.1, weight decay 5e-4, batch
64; the learning rate is multiplied by 0.1 at fixed epochs.  The step epochs
are given as fractions of the run so a short run keeps the recipe's shape:
CIFAR's 60/120/180 of 200 epochs, Tiny-ImageNet's 40/60/70 of 80.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = ["TrainConfig", "default_milestones", "lr_at_epoch", "make_optimizer"]

_MILESTONE_FRACTIONS = {
    "tiny-imagenet": (40 / 80, 60 / 80, 70 / 80),
}
_DEFAULT_FRACTIONS = (60 / 200, 120 / 200, 180 / 200)


def default_milestones(dataset: str, epochs: int) -> list[int]:
    """Epochs (0-based, the first epoch run at the lower rate) of the x0.1 steps for a run of ``epochs``."""
    fractions = _MILESTONE_FRACTIONS.get(dataset, _DEFAULT_FRACTIONS)
    out = sorted({round(f * epochs) for f in fractions})
    return [e for e in out if 0 < e < epochs]


@dataclass
class TrainConfig:
    """Everything a training run needs besides the graph and the data.

    ``milestones=None`` takes :func:`default_milestones` for the dataset.
    ``node_lr`` optionally gives one learning rate per network node.
    """

    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: Optional[list[int]] = None
    gamma: float = 0.1
    node_lr: Optional[list[float]] = None
    seed: int = 0  # seeds the nodes' initialisation, and the batches unless data_seed is set
    # The batches of epoch e are those of (data_seed, e + data_offset): a trial packed with others
    # (ktg_fast.pack) sees the pack's batches; the same numbers here make a lone run see them too.
    data_seed: Optional[int] = None
    data_offset: int = 0
    augment: bool = True
    check_every: int = 50  # steps between host reads of the non-finite-loss flag
    # Arithmetic of the forward passes: "fp32", "bf16" or "fp16"; None: fp32 on the CPU, bf16 on a CUDA
    # device that supports it (the graph loss, weights and checkpoints stay fp32 whatever this is).
    precision: Optional[str] = None
    channels_last: bool = False  # channels-last images (and nets): faster on some devices, slower on others

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight decay must be >= 0 and momentum in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        if self.data_offset < 0:
            raise ValueError(f"data_offset must be >= 0, got {self.data_offset}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")

    def node_rates(self, num_nodes: int) -> list[float]:
        """Base learning rate of each network node (1..M): ``node_lr`` when given, else ``lr`` for all.

        Raises ValueError when ``node_lr`` does not hold one rate per network node.
        """
        if self.node_lr is None:
            return [self.lr] * num_nodes
        if len(self.node_lr) != num_nodes:
            raise ValueError(f"node_lr has {len(self.node_lr)} entries but the graph has {num_nodes} network nodes")
        return [float(x) for x in self.node_lr]

    @property
    def batch_seed(self) -> int:
        """The seed of the batch order and augmentation: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def resolved_milestones(self, dataset: str) -> list[int]:
        return list(self.milestones) if self.milestones is not None else default_milestones(dataset, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at_epoch(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Step schedule: ``base_lr * gamma ** (number of milestones <= epoch)`` (epoch 0-based)."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def make_optimizer(
    param_groups: Sequence[Sequence[torch.nn.Parameter]], lrs: Sequence[float], cfg: TrainConfig
) -> torch.optim.SGD:
    """One SGD over all trainable nodes, one parameter group per node.

    Each node's loss reaches only its own parameters, so this equals one SGD
    per node; per-node groups keep per-node learning rates possible.
    """
    if len(lrs) != len(param_groups):
        raise ValueError(f"{len(lrs)} learning rates for {len(param_groups)} parameter groups")
    groups = [{"params": list(p), "lr": lr, "base_lr": lr} for p, lr in zip(param_groups, lrs)]
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
