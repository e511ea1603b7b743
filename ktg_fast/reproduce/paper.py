"""The paper's figures (Minami et al., *Knowledge Transfer Graph for Deep Collaborative Learning*):
the one place they are written.

Table 1 is the vanilla accuracy (%) of each model on CIFAR-10, CIFAR-100 and Tiny-ImageNet; Table 2
compares methods on CIFAR-100, node 1 (ResNet32) being the target. Both are the test accuracy, mean
and standard deviation over five runs. Models are named by their *roles*
(:data:`ROLES`): a reproduction with smaller stand-ins maps each role onto its own model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Figure", "Table2Row", "ROLES", "ROLE_NAMES", "TABLE1", "TABLE2", "TABLE2_DATASET", "TABLE1_DATASETS",
           "table1_figure", "table2_figure", "frozen_role", "base_role", "model_label"]

# The paper's three models, in the order --models takes their stand-ins.
ROLES = ("resnet32", "resnet110", "wrn28_2")
ROLE_NAMES = {"resnet32": "ResNet32", "resnet110": "ResNet110", "wrn28_2": "WRN28-2"}
FROZEN_MARK = "*"  # the paper's mark of a pre-trained (frozen) node


@dataclass(frozen=True)
class Figure:
    """One accuracy of the paper (%): mean, standard deviation (None: N/A), and whether the paper cites
    it from another paper (its ``**``) instead of measuring it."""

    mean: float
    std: Optional[float]
    cited: bool = False

    def text(self) -> str:
        """``72.00 ± 0.44``, ``73.42** ± N/A``."""
        std = "N/A" if self.std is None else f"{self.std:.2f}"
        return f"{self.mean:.2f}{'**' if self.cited else ''} ± {std}"


@dataclass(frozen=True)
class Table2Row:
    """One row of Table 2.

    Attributes:
        key: a short stable name (``dml2-mixed``), used for run folders and results.json.
        method: the paper's method column (``DML``, ``KD (T = 2)``, ``Ours`` ...).
        kind: ``vanilla``, ``dml``, ``kd``, ``ours`` (a searched graph) or ``cited`` (not run here).
        nodes: the node models by role, node 1 (the target) first; ``*`` marks a pre-trained node.
        figure: the paper's accuracy of node 1 on :data:`TABLE2_DATASET`.
        note: what the nodes column says instead of models (cited rows).
    """

    key: str
    method: str
    kind: str
    nodes: tuple[str, ...]
    figure: Figure
    note: str = ""


TABLE1_DATASETS = ("cifar10", "cifar100", "tiny-imagenet")

TABLE1: dict[str, dict[str, Figure]] = {
    "resnet32": {"cifar10": Figure(92.99, 0.28), "cifar100": Figure(70.71, 0.39),
                 "tiny-imagenet": Figure(52.89, 0.18)},
    "resnet110": {"cifar10": Figure(94.01, 0.28), "cifar100": Figure(72.59, 0.54),
                  "tiny-imagenet": Figure(55.49, 0.55)},
    "wrn28_2": {"cifar10": Figure(94.40, 0.07), "cifar100": Figure(74.60, 0.38),
                "tiny-imagenet": Figure(58.60, 0.25)},
}

TABLE2_DATASET = "cifar100"
_SHARED = "(4 × ResNet32 with shared intermediate layers)"
R32, R110, WRN = ROLES

TABLE2: tuple[Table2Row, ...] = (
    Table2Row("vanilla", "Vanilla", "vanilla", (R32,), Figure(70.71, 0.39)),
    Table2Row("dml2", "DML", "dml", (R32, R32), Figure(72.00, 0.44)),
    Table2Row("kd", "KD (T = 2)", "kd", (R32, WRN + FROZEN_MARK), Figure(71.88, 0.78)),
    Table2Row("dml2-mixed", "DML", "dml", (R32, WRN), Figure(72.71, 0.18)),
    Table2Row("ours2", "Ours", "ours", (R32, WRN), Figure(72.88, 0.41)),
    Table2Row("dml3", "DML", "dml", (R32, R32, R32), Figure(72.09, 0.43)),
    Table2Row("dml3-mixed", "DML", "dml", (R32, WRN, R32), Figure(72.89, 0.21)),
    Table2Row("ours3", "Ours", "ours", (R32, WRN, R32), Figure(73.46, 0.28)),
    Table2Row("dml4", "DML", "dml", (R32, R32, R32, R32), Figure(72.76, 0.35)),
    Table2Row("song", "Song et al.", "cited", (R32, R32, R32, R32), Figure(73.68, 0.26, cited=True), _SHARED),
    Table2Row("one", "ONE", "cited", (R32, R32, R32, R32), Figure(73.42, None, cited=True), _SHARED),
    Table2Row("dml4-mixed", "DML", "dml", (R32, WRN, R32, R110), Figure(72.87, 0.49)),
    Table2Row("ours4", "Ours", "ours", (R32, WRN, R32, R110), Figure(74.06, 0.34)),
)


def frozen_role(node: str) -> bool:
    """Whether a Table 2 node (``wrn28_2*``) is a pre-trained, frozen one."""
    return node.endswith(FROZEN_MARK)


def base_role(node: str) -> str:
    """The role of a Table 2 node without its frozen mark."""
    return node[:-len(FROZEN_MARK)] if frozen_role(node) else node


def model_label(model: str) -> str:
    """``resnet32`` -> ``ResNet32``, ``wrn10_1*`` -> ``WRN10-1*`` (display only: how the tables name models)."""
    mark = "*" if model.endswith("*") else ""
    m = model.rstrip("*")
    if m.startswith("resnet") and m[6:].isdigit():
        return f"ResNet{m[6:]}{mark}"
    if m.startswith("wrn") and "_" in m:
        return "WRN" + m[3:].replace("_", "-") + mark
    return m + mark


def table1_figure(role: str, dataset: str) -> Optional[Figure]:
    """The paper's vanilla accuracy of ``role`` on ``dataset`` (canonical name), or None when it has none."""
    return TABLE1.get(role, {}).get(dataset)


def table2_figure(row: Table2Row, dataset: str) -> Optional[Figure]:
    """The paper's figure of a Table 2 row on ``dataset``: only CIFAR-100 has them."""
    return row.figure if dataset == TABLE2_DATASET else None
