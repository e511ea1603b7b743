"""The fused step captured once as a CUDA graph and replayed per batch.

After a few eager warm-up steps (on a side stream, as the ``torch.cuda.graphs``
recipe asks) the forward of every group, the graph loss, the backward and the
optimizer update are captured once and replayed per batch from static input
buffers; learning rates and linear-gate progress are device tensors, so a
replay sees new values.  Where capture fails the step stays on the fused path
and says so once.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from ..graph import Graph
from ..recipe import TrainConfig
from .base import say_once
from .fused import FusedStep

__all__ = ["CudaGraphStep"]


class CudaGraphStep(FusedStep):
    """The fused step captured once as a CUDA graph and replayed per batch.

    The first ``warmup`` calls run the fused step eagerly on a side stream
    (they are real training steps: lazy initialisation, autotuning and the
    first-step bookkeeping happen there); the next call copies its batch into
    static buffers, captures forward, loss, backward and update, and replays.
    Later batches are copied into the static buffers and replayed; a batch of
    another shape runs eagerly.  Returned tensors are copies, safe to keep.
    If capture raises, the step stays on the fused path (logged once).
    """

    kind = "cudagraph"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto",
                 streams: bool = True, use_vmap: bool = True, warmup: int = 3, **kwargs):
        # kwargs: precision, channels_last (FusedStep); mode, cache_dir (the compiled variant, compiled.py)
        super().__init__(graph, nets, cfg, loss_impl=loss_impl, streams=streams, use_vmap=use_vmap, **kwargs)
        if self.device.type != "cuda":
            raise ValueError("a CUDA-graph step needs the nets on a CUDA device; use --step fused on "
                             f"{self.device.type}")
        self.warmup = max(1, int(warmup))
        self.steady_after = self.warmup + 1  # warm-up calls, then the call that captures
        self._calls = 0
        self._cuda_graph: Optional["torch.cuda.CUDAGraph"] = None
        self._failed = False
        self._last_shape: Optional[tuple] = None
        self._side = torch.cuda.Stream(self.device)
        self._capture_stream = torch.cuda.Stream(self.device)

    def __call__(self, x, y, progress):
        with self._on_device():
            return self._call(x, y, progress)

    def _call(self, x, y, progress):
        if self._cuda_graph is not None and x.shape == self._sx.shape and y.shape == self._sy.shape:
            self._sx.copy_(x)
            self._sy.copy_(y)
            if isinstance(progress, torch.Tensor):
                self._sp.copy_(progress.reshape(self._sp.shape) if progress.numel() == self._sp.numel() else progress)
            else:
                self._sp.fill_(float(progress))
            self._cuda_graph.replay()
            return self._out_loss.clone(), self._out_logits.clone()
        shape = (tuple(x.shape), tuple(y.shape))
        # Capture after the warm-up, on a batch shaped like the last one (not an odd one out).
        if self._cuda_graph is None and not self._failed and self._calls >= self.warmup and shape == self._last_shape:
            try:
                self._capture(x, y, progress)
            except Exception as e:  # noqa: BLE001 - any capture failure means "stay eager"
                self._capture_failed(e)
            else:
                self._cuda_graph.replay()
                return self._out_loss.clone(), self._out_logits.clone()
        self._calls += 1
        self._last_shape = shape
        return self._eager_side(x, y, progress)

    def _eager_side(self, x, y, progress) -> tuple[torch.Tensor, torch.Tensor]:
        # Warm-up on a side stream, as the torch.cuda.graphs recipe asks.
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            for t in (x, y, progress):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(self._side)
            node_loss, logits = self._train_body(x, y, progress)
        main.wait_stream(self._side)
        return node_loss.clone(), logits.clone()  # allocated on main, so the caller may free them there

    def _capture(self, x, y, progress) -> None:
        self._sx = x.detach().clone()
        self._sy = y.detach().clone()
        # Progress: 0-dim, or one value per network node (a pack's per-trial progress).
        shape = progress.shape if isinstance(progress, torch.Tensor) and progress.dim() == 1 else ()
        self._sp = torch.zeros(shape, dtype=torch.float32, device=self.device)
        if isinstance(progress, torch.Tensor):
            self._sp.copy_(progress.reshape(shape))
        else:
            self._sp.fill_(float(progress))
        graph = torch.cuda.CUDAGraph()
        prev = torch.cuda.current_stream(self.device)
        try:
            # A capture stream of the nets' device (torch.cuda.graph's default is made on whichever device
            # is current at its first use), and thread-local errors: DALI's and other threads' CUDA calls
            # during the capture are theirs, not an invalidation of ours.
            with torch.cuda.graph(graph, stream=self._capture_stream, capture_error_mode="thread_local"):
                loss, logits = self._train_body(self._sx, self._sy, self._sp)
        except BaseException:
            torch.cuda.set_stream(prev)  # an aborted capture may leave its stream current
            raise
        self._out_loss, self._out_logits = loss, logits
        self._cuda_graph = graph

    def _capture_failed(self, e: BaseException) -> None:
        self._failed = True
        self._cuda_graph = None
        self.kind = "fused"
        if self._streams is not None:  # streams that took part in an aborted capture are not reused
            self._streams = [torch.cuda.Stream(self.device) for _ in self.groups]
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - a capture error can surface here once; it is the one we report
            pass
        say_once(logging.WARNING, "CUDA graph capture failed (%s: %s); using the fused step without a graph",
                  type(e).__name__, str(e).splitlines()[0] if str(e) else "")
