"""The fused step under ``torch.compile`` (Inductor), and the on-disk compile cache.

:class:`CompiledStep` is :class:`~.fused.FusedStep` with its two halves
compiled: (1) every node group's vmapped forward (under autocast), the graph
loss and, for fp16, the per-node loss scaling, as one Dynamo graph whose
backward AOTAutograd compiles with it; (2) the flat SGD update (per-node
unscale and overflow check for fp16) as a second graph.  The backward between
them is the eager autograd engine running the compiled backward graph and
accumulating into the flat gradient buffers, which keeps gradients where the
optimizer and the checkpoints find them; a third region would need compiled
autograd for no gain on these graphs.  Learning rates, loss scales and linear-gate
progress are tensors, so changing them never recompiles; checkpoints, momentum
buffers and ``eval_logits`` are the fused step's (per node, any step path
resumes them).

The first call runs eagerly (it probes vmap, adopts the first gradients and
binds them to the flat buffers, as the fused step does); later calls run the
compiled regions.  If Dynamo or Inductor fails to compile, the step says so
once and stays on the fused path.

:func:`compile_cache_dir` keeps Inductor's caches (FX graphs, AOTAutograd
graphs, generated kernels) in a folder of the user's choice, shared by every
process that sets the same folder: a search compiles each architecture group once.

:class:`CompiledCudaGraphStep` is the CUDA-graph step whose captured body is the
compiled one (Inductor's kernels inside our own capture).
"""
from __future__ import annotations

import logging
import os
import time
import types
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..graph import Graph
from ..loss import GraphLoss
from ..recipe import TrainConfig
from .base import say_once
from .cuda_graph import CudaGraphStep
from .fused import FusedStep

__all__ = ["CompiledStep", "CompiledCudaGraphStep", "compile_cache_dir", "graph_breaks"]

log = logging.getLogger("ktg_fast")
# Inductor's CPU path imports torch.utils.cpp_extension, which warns "No CUDA runtime is found, using
# CUDA_HOME=..." on every machine without a GPU: noise there, not a fault.
if not torch.cuda.is_available():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def compile_cache_dir(path: Union[str, os.PathLike]) -> Path:
    """Keep Inductor's on-disk caches under ``path`` (created if missing); return it, absolute.

    Sets ``TORCHINDUCTOR_CACHE_DIR`` (inherited by worker processes started
    afterwards, so they share it; Triton's kernel cache follows it unless
    ``TRITON_CACHE_DIR`` is set) and turns on the FX-graph and AOTAutograd
    caches.  Call it before the first compile; calling it later with another
    folder clears the in-process memo of the old one.  Concurrent processes may
    share the folder (Inductor writes its entries atomically).

    Raises:
        OSError: the folder cannot be created.
    """
    folder = Path(path).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    if before is not None and Path(before).resolve() != folder:
        from torch._inductor.utils import clear_caches

        clear_caches()  # cache_dir() results are memoised in places: forget the old folder
    return folder


def graph_breaks(fn, *args, **kwargs) -> dict:
    """Run ``fn(*args, **kwargs)`` once under ``torch._dynamo.explain``: graphs, breaks and their reasons.

    It *executes* ``fn`` (in-place updates happen): use it on a throw-away step.  It resets Dynamo
    before and after (every compiled function of the process compiles again on its next call).
    Returns ``{"graphs": int, "breaks": int, "reasons": [str, ...]}``.
    """
    torch._dynamo.reset()
    try:
        out = torch._dynamo.explain(fn)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return {"graphs": out.graph_count, "breaks": out.graph_break_count,
            "reasons": [str(r.reason).splitlines()[0] for r in out.break_reasons]}


def _own_code(fn, obj):
    """``fn`` bound to ``obj`` with a code object of its own.

    Dynamo keeps compiled graphs per code object and stops compiling (silently running eagerly)
    after ``recompile_limit`` guard failures: steps built one after another in a process (a search's
    trials, the tests) would each fail the previous ones' guards on ``self``.  A private code object
    gives every step its own cache.
    """
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, obj)


# GraphLoss's device-tensor caches are lru_cache'd: Dynamo traces through them (constants), and says so.
_LRU_WARNING = r"Dynamo detected a call to a `functools.lru_cache`"


class CompiledStep(FusedStep):
    """The fused step (vmapped node groups, graph loss, flat SGD) compiled with ``torch.compile``.

    Args:
        graph, nets, cfg, loss_impl, precision, channels_last: as :class:`~.fused.FusedStep`
            (no CUDA streams: the compiled forward runs the groups in one graph).
        use_vmap: batch each node group with vmap; None: on CUDA only (on the CPU the nets of a group
            are traced one by one into the same graph, which Inductor makes faster).
        mode: ``torch.compile`` mode (None: Inductor's default; e.g. "max-autotune-no-cudagraphs").
        cache_dir: if given, :func:`compile_cache_dir` is called with it first.
        dynamic: ``torch.compile``'s ``dynamic`` (False: a batch of another shape compiles its own graph,
            as the last, smaller batch of an epoch would; the trainer drops it).

    Attributes:
        compile_seconds: wall time of the first compiled step (tracing, Inductor and one step's work;
            a warm cache makes it short), None before it.

    Raises:
        ValueError: as :class:`~.fused.FusedStep`.
    """

    kind = "compiled"
    steady_after = 2  # the first call runs eagerly, the second compiles

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto",
                 use_vmap: Optional[bool] = None, precision: str = "fp32", channels_last: bool = False,
                 mode: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 dynamic: bool = False, streams: bool = False, loss: Optional[GraphLoss] = None):
        if cache_dir is not None:
            compile_cache_dir(cache_dir)
        # streams is accepted for the CUDA-graph subclass's signature; compiled groups run in one graph.
        if use_vmap is None:
            # Measured (bench/test_bench_step.py, 2 CPU cores): on the CPU Inductor's step is ~2x faster with
            # each net traced on its own than with vmap's grouped convolutions, which oneDNN runs slowly;
            # on CUDA one vmapped kernel per layer saves launches.
            devs = {p.device.type for net in nets for p in net.parameters()}
            use_vmap = devs == {"cuda"}
        super().__init__(graph, nets, cfg, loss_impl=loss_impl, streams=False, use_vmap=use_vmap,
                         precision=precision, channels_last=channels_last, loss=loss)
        self.compile_mode = mode
        opts = dict(mode=mode, dynamic=dynamic)
        self._compiled_forward_loss = torch.compile(_own_code(CompiledStep._fused_forward_loss, self), **opts)
        self._compiled_update = torch.compile(_own_code(CompiledStep._fused_update, self), **opts)
        self._compile_failed: Optional[str] = None
        self.compile_seconds: Optional[float] = None
        self._progress: Optional[torch.Tensor] = None
        self._use_compiled = False

    # ------------------------------------------------------------ the regions
    def _fused_forward_loss(self, x, y, progress):
        return FusedStep._forward_loss(self, x, y, progress)

    def _fused_update(self) -> None:
        FusedStep._update(self)

    @property
    def compiled(self) -> bool:
        """Whether later steps run the compiled regions (False after a compile failure)."""
        return self._compile_failed is None

    def _progress_tensor(self, progress: Union[float, torch.Tensor]) -> torch.Tensor:
        # A Python float would be specialised on: a recompile per value.  A tensor is a graph input
        # (0-dim, or one value per network node: a pack's per-trial progress).
        if isinstance(progress, torch.Tensor):
            shape = progress.shape if progress.dim() == 1 else ()
            return progress.reshape(shape).to(self.device, torch.float32)
        if self._progress is None:
            self._progress = torch.zeros((), dtype=torch.float32, device=self.device)
        return self._progress.fill_(float(progress))

    def _forward_loss(self, x, y, progress):
        if not self._use_compiled or self._compile_failed:
            return FusedStep._forward_loss(self, x, y, progress)
        return self._try_compiled(self._compiled_forward_loss, FusedStep._forward_loss, x, y,
                                  self._progress_tensor(progress))

    def _update(self) -> None:
        if not self._use_compiled or self._compile_failed:
            return FusedStep._update(self)
        return self._try_compiled(self._compiled_update, FusedStep._update)

    def _try_compiled(self, compiled, eager, *args):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_LRU_WARNING)
                return compiled(*args)
        except (torch._dynamo.exc.TorchDynamoException, NotImplementedError) as e:
            # Compile-time failures (Dynamo cannot trace, Inductor cannot lower) raise before the region runs.
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._compile_failed = f"{type(e).__name__}: {first}"
            if self.kind == "compiled":
                self.kind = "fused"
            say_once(logging.WARNING, "torch.compile failed for the compiled step (%s); using the fused step",
                     self._compile_failed)
            return eager(self, *args)

    def _train_body(self, x, y, progress):
        # The first step runs eagerly (vmap probes, first gradients adopted into the flat buffers).
        self._use_compiled = self._first_step_done and self._compile_failed is None
        timing = self._use_compiled and self.compile_seconds is None
        t0 = time.perf_counter()
        out = FusedStep._train_body(self, x, y, progress)
        if timing and self._compile_failed is None:  # the first compiled step: tracing and Inductor (or a cache hit)
            if self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - t0
            log.info("compiled step: first compiled step took %.1f s (Dynamo, Inductor; Inductor cache %s)",
                     self.compile_seconds, os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"))
        return out

    def explain(self, x: torch.Tensor, y: torch.Tensor, progress: Union[float, torch.Tensor]) -> dict:
        """Graph breaks of both compiled regions on this batch: ``{"forward_loss": {...}, "update": {...}}``.

        Runs one real forward and one real update (BatchNorm statistics and weights change; gradients
        from the forward are dropped): call it on a throw-away step after its first call.  See
        :func:`graph_breaks`.

        Raises:
            RuntimeError: before the first step (the regions are compiled from the second step on).
        """
        if not self._first_step_done:
            raise RuntimeError("call the step once before explain(): the first step runs eagerly")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LRU_WARNING)
            fwd = graph_breaks(self._fused_forward_loss, self._prepare_input(x), y, self._progress_tensor(progress))
            upd = graph_breaks(self._fused_update)
        return {"forward_loss": fwd, "update": upd}


class CompiledCudaGraphStep(CudaGraphStep, CompiledStep):
    """The CUDA-graph step capturing the compiled step's body: Inductor's kernels replayed as one CUDA graph.

    The warm-up calls run eagerly (call 1) and compiled (calls 2 on, where Inductor compiles and
    autotunes), then the next call captures forward, loss, backward and update as in
    :class:`~.cuda_graph.CudaGraphStep`.  If compiling fails, it captures the fused step instead;
    if capture fails, it stays on the (compiled or fused) step without a graph.  Takes
    :class:`CompiledStep`'s and :class:`~.cuda_graph.CudaGraphStep`'s arguments.
    """

    kind = "cudagraph"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, warmup: int = 3, **kwargs):
        # At least one compiled warm-up call: Inductor must compile and autotune before, not during, capture.
        super().__init__(graph, nets, cfg, warmup=max(2, int(warmup)), **kwargs)

    def _capture_failed(self, e: BaseException) -> None:
        super()._capture_failed(e)
        if self.compiled:
            self.kind = "compiled"  # no graph, but still the compiled regions
