"""``--pack auto``: how many trials one worker trains at once, from a short measurement on its device.

For K = 1, 2, 4, ... the probe trains a pack of K copies of the space's heaviest
graph (every auxiliary node the largest model, every edge open) for a few steps on
random batches of the dataset's shape, and measures trial-steps per second (K
steps of one trial per step of the pack).  It stops at the first K that gains
less than ``min_gain`` over the best so far, runs out of memory, or would use
more than ``memory_fraction`` of the device.  On a CPU the search cores are
already busy with one trial, so packing rarely pays there; the probe says so with
numbers instead of a rule.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from ..data import canonical_name, dataset_info
from ..graph import Graph, Node
from ..models import get_model
from ..nodes import build_nodes
from ..pack import pack_graphs
from ..steps import default_precision, make_step
from .config import SearchConfig

__all__ = ["probe_pack", "heaviest_graph", "PROBE_SIZES"]

log = logging.getLogger("ktg_fast.search")

PROBE_SIZES = (1, 2, 4, 8, 16)


def _params(model: str, num_classes: int, in_channels: int) -> int:
    return sum(p.numel() for p in get_model(model, num_classes=num_classes, in_channels=in_channels).parameters())


def heaviest_graph(cfg: SearchConfig, num_classes: int, in_channels: int) -> Graph:
    """The space's most expensive graph: the target, then the model with the most parameters on every
    auxiliary node, every edge (label edges too) with a ``through`` gate."""
    space = cfg.space()
    big = max(space.models, key=lambda m: _params(m, num_classes, in_channels))
    n = space.nodes
    gates = [["through" if s != t and t > 0 else "cutoff" for t in range(n + 1)] for s in range(n + 1)]
    return Graph([Node(space.target)] + [Node(big) for _ in range(n - 1)], gates, temperature=space.temperature,
                 target=1)


def _rate(cfg: SearchConfig, graph: Graph, k: int, device: torch.device, steps: int) -> float:
    """Trial-steps per second of a pack of ``k`` copies of ``graph`` (random batches, no data read)."""
    c, size, classes = dataset_info(canonical_name(cfg.dataset))
    packed = pack_graphs([graph] * k)
    torch.manual_seed(0)
    nets = build_nodes(packed.graph, num_classes=classes, in_channels=c, dataset=canonical_name(cfg.dataset),
                       device=device)
    precision = cfg.precision or default_precision(device)
    step = make_step(cfg.step, packed.graph, nets, cfg.train_config(0), total_steps=1000, precision=precision,
                     channels_last=cfg.channels_last, compile_cache=cfg.compile_cache_folder())
    x = torch.randn(cfg.batch_size, c, size, size, device=device)
    y = torch.randint(0, classes, (cfg.batch_size,), device=device)
    progress = torch.zeros(packed.graph.num_nodes, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Warm-up: every call up to the steady state (a CUDA-graph step's eager calls and capture, a compiled
    # step's compile) and one more for the allocator; timing any of them would make a pack look slow.
    for _ in range(max(2, step.steady_after + 1)):
        step(x, y, progress)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y, progress)
    sync()
    return k * steps / (time.perf_counter() - t0)


def probe_pack(cfg: SearchConfig, device: torch.device, *, sizes: tuple[int, ...] = PROBE_SIZES, steps: int = 3,
               min_gain: float = 1.1, memory_fraction: float = 0.8) -> tuple[int, list[dict]]:
    """The pack size to use on ``device`` and the measurements behind it.

    Returns:
        (K, rows): rows of ``{"pack": k, "trial_steps_per_s": r}`` (``"stopped"``: why the probe stopped there).
    """
    c, _, classes = dataset_info(canonical_name(cfg.dataset))
    graph = heaviest_graph(cfg, classes, c)
    rows: list[dict] = []
    best_k, best = 1, 0.0
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    for k in sizes:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            rate = _rate(cfg, graph, k, device, steps)
        except torch.OutOfMemoryError:
            rows.append({"pack": k, "trial_steps_per_s": None, "stopped": "out of memory"})
            break
        row: dict = {"pack": k, "trial_steps_per_s": round(rate, 3)}
        rows.append(row)
        if rate < best * min_gain:
            row["stopped"] = f"less than {min_gain:.2f}x pack {best_k}"
            break
        best_k, best = k, rate
        if total is not None and 2 * torch.cuda.max_memory_allocated(device) > memory_fraction * total:  # next k: 2x
            row["stopped"] = "the next size would pass the memory limit"
            break
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best_k, rows


def describe_probe(k: int, rows: list[dict], device: Optional[torch.device] = None) -> str:
    """``--pack auto on cpu: 1: 3.1, 2: 3.0 trial-steps/s -> pack 1``."""
    rates = ", ".join(f"{r['pack']}: {r['trial_steps_per_s'] if r['trial_steps_per_s'] is not None else 'OOM'}"
                      for r in rows)
    return f"--pack auto{f' on {device}' if device else ''}: {rates} trial-steps/s -> pack {k}"
