"""How fast a sampled graph trains: seconds per epoch, for the search's cost model (``budget.py``).

    python bench/search_throughput.py --graph-seed 0 --window 20 [--pack K] [--barrier DIR --workers W]

Samples a graph from the paper's space (3 nodes, ResNet32 target, auxiliary
ResNet32 / ResNet110 / WRN-28-2, four gates), builds it on the device with
random-weight teachers for its frozen nodes, and times training steps on a
static on-device batch (batch 64, 32x32x3, 100 classes: CIFAR-100 sized; the
loader is left out) for a fixed wall-clock window, then the validation
forward pass.  One epoch = 40,000 / 64 steps + 10,000 validation images.
With ``--barrier`` several processes start their windows together (several
workers per GPU).  With ``--pack K`` the worker trains K sampled graphs (seeds
graph-seed .. graph-seed + K - 1) packed into one step (``--pack`` of the
search): an epoch then advances K trials.  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import optuna
import torch

from ktg_fast.cli_common import run_cli
from ktg_fast.device import resolve_device, use_device
from ktg_fast.models import get_model
from ktg_fast.nodes import build_nodes, save_model_checkpoint
from ktg_fast.recipe import TrainConfig
from ktg_fast.steps import make_step
from ktg_fast.nodes import teacher_path
from ktg_fast.pack import pack_graphs
from ktg_fast.search.budget import expected_epochs_per_trial
from ktg_fast.search.space import FrozenTargetError, SearchSpace

__all__ = ["sample_graph", "measure_epoch_seconds"]

TRAIN_IMAGES, VAL_IMAGES, BATCH, CLASSES = 40_000, 10_000, 64, 100


def sample_graph(seed: int, nodes: int = 3, target: str = "resnet32") -> Any:
    """The ``seed``-th graph a random search would train (graphs with a frozen target skipped)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(nodes=nodes, target=target)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    while True:
        t = study.ask()
        try:
            return space.graph(space.suggest(t))
        except FrozenTargetError:
            study.tell(t, state=optuna.trial.TrialState.FAIL)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_epoch_seconds(graph: Any, *, device: str = "auto", step: str = "auto", window_s: float = 20.0,
                          warmup: int = 3, barrier: Optional[tuple[Path, int, int]] = None,
                          val_sample: int = 1000, total_steps: Optional[int] = None) -> dict[str, Any]:
    """Time ``graph``'s training step and validation pass; extrapolate one search epoch.

    Args:
        barrier: (folder, workers, my index): wait until every worker is warm before timing.
        val_sample: validation images actually run (scaled to 10,000).
        total_steps: the step choice's hint, as a search trial passes it (a lone trial: its expected steps
            under ASHA; a pack: the budget's), so the step path timed is the one the search trains with.

    Returns one record; ``setup_s`` is building the step and its warm-up (compiling, capturing): what
    each new trial pays before its first timed step.
    """
    dev = use_device(resolve_device(device))
    with tempfile.TemporaryDirectory() as teachers:
        for t in graph.frozen:  # speed does not depend on the teacher's weights
            model = graph.nodes[t - 1].model
            save_model_checkpoint(teacher_path(teachers, "cifar100", model), get_model(model, num_classes=CLASSES),
                                  name=model, num_classes=CLASSES, in_channels=3)
        torch.manual_seed(0)
        nets = build_nodes(graph, num_classes=CLASSES, in_channels=3, dataset="cifar100", device=dev,
                           teacher_dir=teachers)
    cfg = TrainConfig(epochs=200, batch_size=BATCH)
    x = torch.rand(BATCH, 3, 32, 32, device=dev)
    y = torch.randint(0, CLASSES, (BATCH,), device=dev)
    progress = torch.full((), 0.5, device=dev)
    _sync(dev)
    t_setup = time.perf_counter()
    st = make_step(step, graph, nets, cfg, total_steps=total_steps)
    st.set_lrs([cfg.lr] * len(graph.trainable))
    # Never time the CUDA-graph capture or the compile: warm up past the steady state.
    for _ in range(max(warmup, st.steady_after + 1)):
        st(x, y, progress)
    _sync(dev)
    setup_s = time.perf_counter() - t_setup
    if barrier is not None:
        folder, workers, me = barrier
        (folder / f"ready{me}").touch()
        while len(list(folder.glob("ready*"))) < workers:
            time.sleep(0.05)
    n, t0 = 0, time.perf_counter()
    while True:
        st(x, y, progress)
        n += 1
        if n % 5 == 0 or dev.type != "cuda":
            _sync(dev)
            if time.perf_counter() - t0 >= window_s:
                break
    _sync(dev)
    step_s = (time.perf_counter() - t0) / n
    if barrier is not None:  # validation timed after everyone's window
        (barrier[0] / f"done{barrier[2]}").touch()
        while len(list(barrier[0].glob("done*"))) < barrier[1]:
            time.sleep(0.05)
    xv = torch.rand(min(1000, val_sample), 3, 32, 32, device=dev)
    st.eval_logits(xv)
    _sync(dev)
    t1, seen = time.perf_counter(), 0
    while seen < val_sample:
        st.eval_logits(xv)
        seen += xv.shape[0]
    _sync(dev)
    val_s = (time.perf_counter() - t1) * VAL_IMAGES / seen
    train_s = step_s * (TRAIN_IMAGES // BATCH)
    return {"graph": graph.to_dict(), "frozen": graph.frozen, "step_path": st.kind, "device": str(dev),
            "steps_timed": n, "step_s": step_s, "train_epoch_s": train_s, "val_epoch_s": val_s,
            "epoch_s": train_s + val_s, "setup_s": setup_s, "total_steps": total_steps}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/search_throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph-seed", type=int, default=0)
    p.add_argument("--pack", type=int, default=1, help="graphs trained at once as one packed step")
    p.add_argument("--device", default="auto")
    p.add_argument("--step", default="auto")
    p.add_argument("--window", type=float, default=20.0, help="seconds of timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--val-sample", type=int, default=1000)
    p.add_argument("--barrier", default=None, help="folder shared by workers started together")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    barrier = (Path(a.barrier), a.workers, a.index) if a.barrier else None
    graphs = [sample_graph(a.graph_seed + i) for i in range(a.pack)]
    graph = graphs[0] if a.pack == 1 else pack_graphs(graphs).graph
    # As the search passes it: a lone trial its expected steps under the paper's ASHA, a pack the budget's.
    epochs = expected_epochs_per_trial(200, 1, 2, 0) if a.pack == 1 else 200
    res = measure_epoch_seconds(graph, device=a.device, step=a.step, window_s=a.window,
                                warmup=a.warmup, barrier=barrier, val_sample=a.val_sample,
                                total_steps=round(epochs * (TRAIN_IMAGES // BATCH)))
    res["graph_seed"], res["pack"] = a.graph_seed, a.pack
    res["pid"] = os.getpid()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
