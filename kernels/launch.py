"""Launch planning for the graph-loss kernels: block sizes, rows per program, the split of C.

Chosen from the shapes and the device, never from data (so a plan is a constant to torch.compile
and a CUDA-graph capture); :mod:`ktg_fast.kernels.aot` builds every plan ahead of time for sm_90.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _triton_graph_loss as K

__all__ = ["Plan", "plan", "single_block", "grad_dtype", "is_available", "interpreted", "interpreter_problem", "DTYPES", "MAX_NODES", "LABEL_BLOCK",
           "SCALE_BLOCK", "SCALE_GRID"]


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_NODES = 16
# Work budget of one program tile: [MP, MP, BLOCK_C] temporaries stay near this many elements.
TILE_BUDGET = 8192
# B up to this is counted inside the kernel (each program reads all labels); larger B by one torch op.
COUNT_IN_KERNEL_MAX_B = 1024
LABEL_BLOCK = 1024
# Split C only into chunks at least this long.
MIN_CHUNK = 8192
SCALE_BLOCK = 4096
# The backward's scale kernel runs a fixed grid of at most this many programs (over all nodes),
# each looping over blocks: a node whose grad_output is 1 then costs a handful of idle programs.
SCALE_GRID = 1024


def single_block(c: int, block_c: int, num_warps: int, blocks: bool = False) -> bool:
    """Whether a row is read once and kept in registers (C fits one block).  Not in a block launch at 16 warps:
    there the tile already fills the registers ptxas gives each thread, and the block's node offsets on top
    spill on sm_90 (bf16, m = 7); the two-pass loop reads the row twice from L1/L2 instead."""
    return c <= block_c and not (blocks and num_warps >= 16)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient buffer the forward writes for logits of ``dtype`` (float16 -> float32)."""
    return torch.float32 if dtype == torch.float16 else dtype


# Whether Triton built this module's kernels for its interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = type(K._fused_kernel).__name__ == "InterpretedFunction"


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (CPU tensors)."""
    return INTERPRETED


@triton.jit
def _probe_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # The one construct the interpreter has broken (a loop bound that is a kernel argument).
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def _probe_interpreter() -> str | None:
    if not INTERPRETED:
        return None
    x = torch.arange(5, dtype=torch.float32)
    out = torch.zeros(1)
    try:
        _probe_kernel[(1,)](x, out, 5, BLOCK=4)
    except Exception as e:  # noqa: BLE001 -- any failure means the interpreter is unusable here
        import numpy
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                f"({type(e).__name__}: {str(e)[:160]}); install numpy<2.4, or Triton 3.7 or later")
    if out.item() != 10.0:
        return f"Triton {triton.__version__}'s interpreter computed a wrong sum in a probe kernel ({out.item()} != 10)"
    return None


# Found once at import (a few milliseconds, interpreter only), so a traced call reads a constant.
_INTERPRETER_PROBLEM = _probe_interpreter()


def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels on CPU tensors, or None when it can (or when
    the kernels are not interpreted).

    Triton 3.6's interpreter calls ``int()`` on a one-element array for a loop bound that is a kernel
    argument, which NumPy 2.4 and later refuse; a tiny kernel run at import finds it.
    """
    return _INTERPRETER_PROBLEM


def is_available(device: torch.device | str) -> bool:
    """Whether ``graph_loss_triton`` can run on tensors of ``device``.

    True on CUDA devices (when CUDA is usable), and on the CPU when the kernels
    were built under the Triton interpreter (``TRITON_INTERPRET=1`` set before
    ``ktg_fast.kernels`` was first imported) and that interpreter works with the
    installed NumPy (:func:`interpreter_problem`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not interpreted()
    if device.type == "cpu":
        return interpreted() and interpreter_problem() is None
    return False


@torch.compiler.assume_constant_result
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (a constant to torch.compile)."""
    if index < 0:
        index = torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count  # cached by torch


class Plan(NamedTuple):
    """Launch configuration chosen from the shapes (and device), never from data."""

    block_c: int
    rows_per_program: int
    num_splits: int
    chunk: int
    num_warps: int
    count_in_kernel: bool


def plan(
    m: int,
    b: int,
    c: int,
    device: torch.device,
    *,
    num_splits: int | None = None,
    block_c: int | None = None,
    rows_per_program: int | None = None,
    sms: int | None = None,
    blocks: bool = False,
) -> Plan:
    """Choose block sizes, rows per program and the C split for an (m, b, c) problem.

    The keyword arguments override the heuristics (tests use them to reach the
    multi-block, multi-row and split-C code paths with small shapes); ``sms``
    (streaming multiprocessors) stands in for the device's when planning ahead
    of time without a GPU (:mod:`ktg_fast.kernels.aot`).  ``blocks``: a block launch
    (``graph_loss_triton_blocks``, m nodes a block), never split across programs: the blocks
    already multiply the programs (see also :func:`single_block`).
    """
    mp = triton.next_power_of_2(m)
    if blocks:
        num_splits = 1
    if block_c is None:
        budget = max(16, TILE_BUDGET // (mp * mp))
        block_c = min(max(16, triton.next_power_of_2(c)), budget)
    if block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two, got {block_c}")
    on_gpu = device.type == "cuda" and not interpreted()
    if not on_gpu:
        sms = 1
    elif sms is None:
        sms = sm_count(-1 if device.index is None else device.index)
    if num_splits is None:
        num_splits = 1
        if on_gpu and b < 2 * sms and c >= 2 * MIN_CHUNK:
            num_splits = max(1, min(triton.cdiv(4 * sms, b), c // MIN_CHUNK))
    num_splits = max(1, min(int(num_splits), triton.cdiv(c, block_c)))
    chunk = triton.cdiv(triton.cdiv(c, num_splits), block_c) * block_c
    num_splits = triton.cdiv(c, chunk)
    if rows_per_program is None:
        if num_splits > 1 or c > block_c:
            rows_per_program = 1
        else:
            # Small C: several rows per program (fewer partial sums to reduce), while keeping
            # >= ~16 programs per SM to hide each row's latency.
            rows_per_program = max(1, min(b // (16 * sms), 16)) if on_gpu else max(1, min(b, 16))
    if rows_per_program < 1:
        raise ValueError(f"rows_per_program must be >= 1, got {rows_per_program}")
    # At most 16 elements of the [MP, MP, BLOCK_C] tile per thread: with 32 (8 warps at M = 16, or 4 at
    # MP = 2, BLOCK_C = 1024) ptxas spills on sm_90 (tests/test_kernel_build.py checks every plan).
    tile = mp * mp * block_c
    num_warps = max(1, min(16, tile // (32 * 16)))
    return Plan(block_c, int(rows_per_program), int(num_splits), int(chunk), num_warps,
                b <= COUNT_IN_KERNEL_MAX_B)
