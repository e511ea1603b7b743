"""Ahead-of-time build of every graph-loss kernel configuration for a CUDA target; no GPU needed.

``python -m ktg_fast.kernels.aot`` compiles, with Triton's own compiler and
ptxas, each distinct kernel that :func:`ktg_fast.kernels.graph_loss.plan` can
choose for the paper's shapes and LLM vocabularies (M up to 16, C from 10 to
262,144, float32 / bfloat16 / float16 logits, T = 1 and T != 1, with and
without the gradient), for compute capability 9.0 (H100, H200) by default, and
prints registers per thread and the stack frame (where spills go) of each.  The test suite runs it on
every CI run and asserts no spill over :data:`SPILL_TOLERANCE_BYTES` (Triton 3.6's ptxas puts 8 bytes of
one bf16 plan on the stack, which costs nothing measurable; a real spill is hundreds of bytes).

Triton must build real kernels, not interpreted ones: run it in a process
where ``TRITON_INTERPRET`` is unset (the test starts a subprocess for that).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import triton

__all__ = ["Build", "configurations", "compile_all", "backend_status"]

# The shapes plan() is asked about: (M, B, C).  Paper: B = 64, C in {10, 100, 200}; LLM: B = 8192
# (counted on the device), and B = 4 (few rows: C split across programs).
# One M per padded node count MP = 1, 2, 4, 8, 16 (the tiles are [MP, MP, BLOCK_C]), non-powers of two
# where they exist so the node masks are exercised.
_MS = (1, 2, 3, 7, 16)
_PAPER = [(64, c) for c in (10, 100, 200)]
_LARGE = [(8192, c) for c in (1000, 32000, 128256, 262144)] + [(4, c) for c in (32000, 262144)]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# Bytes per thread of stack or local memory a build may use before it counts as spilling.
SPILL_TOLERANCE_BYTES = 8


@dataclass(frozen=True)
class Build:
    """One compiled kernel: what was built and its resource use on the target."""

    kernel: str
    dtype: str
    constants: tuple
    num_warps: int
    registers: int
    stack_bytes: int  # spilled registers live in the stack frame (local memory)
    local_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> int:
        return self.stack_bytes + self.local_bytes


def backend_status(capability: int = 90) -> tuple[bool, str]:
    """Whether Triton's CUDA backend (compiler and ptxas) can build for ``capability`` here."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401  (probe: the CUDA backend loads)

        _tool("ptxas")
        _tool("cuobjdump")
        GPUTarget("cuda", capability, 32)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot build here"
        return False, f"Triton's CUDA backend cannot load: {type(e).__name__}: {e}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "TRITON_INTERPRET is set: Triton builds interpreted kernels in this process"
    return True, "ok"


def _tool(name: str) -> str:
    """Path of a CUDA tool Triton ships (ptxas, cuobjdump)."""
    try:  # Triton >= 3.4
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except (ImportError, AttributeError):
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary(name)[0]


def _kernel_sets(dtype: torch.dtype, m: int, b: int, c: int, temperature: float, write_grad: bool,
                 gather: bool = False):
    """(kernel, signature, constexprs, num_warps) for each launch graph_loss_triton makes for this problem;
    ``gather``: graph_loss_triton_blocks' launch for blocks of m nodes (never split)."""
    from . import _triton_graph_loss as K
    from .launch import LABEL_BLOCK, SCALE_BLOCK, grad_dtype, plan, single_block

    cfg = plan(m, b, c, torch.device("cuda"), sms=132, blocks=gather)
    mp, mp1 = triton.next_power_of_2(m), triton.next_power_of_2(m + 1)
    t = float(temperature)
    tc = dict(T=t, K_T=K._LOG2E / t, SAME_T=t == 1.0)
    cc = dict(COUNT_IN_KERNEL=cfg.count_in_kernel, LABEL_BLOCK=min(LABEL_BLOCK, triton.next_power_of_2(b)))
    z, g = _TL[dtype], _TL[grad_dtype(dtype)]
    i64 = "i64" if b * c * m >= 2 ** 31 else "i32"
    out = []
    if cfg.num_splits == 1:
        sig = dict(logits_ptr=f"*{z}", labels_ptr="*i64", gates_ptr="*i32", progress_ptr="*fp32", count_ptr="*i64",
                   grad_ptr=f"*{g}", edge_ptr="*fp32", node_ptr="*fp32", nodes_ptr="*i32", B="i32", C="i32",
                   s_m=i64, s_b="i32", s_y="i32", s_p="i32", ignore_index="i32")
        const = dict(M=m, MP=mp, MP1=mp1, ROWS=cfg.rows_per_program, BLOCK_C=cfg.block_c,
                     SINGLE_BLOCK=single_block(c, cfg.block_c, cfg.num_warps, gather), WRITE_GRAD=write_grad,
                     GATHER=gather, **cc, **tc)
        out.append((K._fused_kernel, sig, const, cfg.num_warps))
    else:
        nsp = triton.next_power_of_2(cfg.num_splits)
        out.append((K._split_stats_kernel,
                    dict(logits_ptr=f"*{z}", gates_ptr="*i32", stats_ptr="*fp32",
                         amax_ptr="*i32", C="i32", s_m=i64, s_b="i32", CHUNK="i32"),
                    dict(M=m, MP=mp, NSPLIT=cfg.num_splits, BLOCK_C=cfg.block_c, K_T=tc["K_T"], SAME_T=tc["SAME_T"]),
                    cfg.num_warps))
        out.append((K._split_grad_kernel,
                    dict(logits_ptr=f"*{z}", labels_ptr="*i64", gates_ptr="*i32", progress_ptr="*fp32",
                         count_ptr="*i64", stats_ptr="*fp32", amax_ptr="*i32", grad_ptr=f"*{g}", xbuf_ptr="*fp32",
                         B="i32", C="i32", s_m=i64, s_b="i32", s_y="i32", s_p="i32", ignore_index="i32",
                         CHUNK="i32"),
                    dict(M=m, MP=mp, NSPLIT=cfg.num_splits, NSP=nsp, BLOCK_C=cfg.block_c, WRITE_GRAD=write_grad,
                         **cc, **tc),
                    cfg.num_warps))
        out.append((K._split_loss_kernel,
                    dict(logits_ptr=f"*{z}", labels_ptr="*i64", gates_ptr="*i32", progress_ptr="*fp32",
                         count_ptr="*i64", stats_ptr="*fp32", amax_ptr="*i32", xbuf_ptr="*fp32", edge_ptr="*fp32",
                         node_ptr="*fp32", B="i32", C="i32", s_m=i64, s_b="i32", s_y="i32", s_p="i32",
                         ignore_index="i32"),
                    dict(M=m, MP=mp, MP1=mp1, ROWS=cfg.rows_per_program, NSPLIT=cfg.num_splits, NSP=nsp,
                         **cc, **tc),
                    1))
    if write_grad:
        n_t = "i64" if b * c >= 2 ** 31 else "i32"
        for in_place in ((True, False) if g != z else (True,)):
            out.append((K._scale_kernel,
                        dict(src_ptr=f"*{g}", dst_ptr=f"*{g if in_place else z}", gout_ptr="*fp32", s_g="i32",
                             N=n_t),
                        dict(BLOCK=SCALE_BLOCK, IN_PLACE=in_place), 8))
    return out


def configurations(ms: Iterable[int] = _MS, dtypes: Iterable[str] = tuple(_DTYPES),
                   write_grads: Iterable[bool] = (True,)) -> list[tuple]:
    """Every distinct (kernel, signature, constexprs, num_warps) plan() leads to over the shape grid.

    By default only the training variant (the gradient written): the no-gradient forward is the
    same kernel without its stores, never the one short of registers.
    """
    seen: dict[tuple, tuple] = {}
    for name in dtypes:
        dtype = _DTYPES[name]
        for m in ms:
            for b, c in _PAPER + _LARGE:
                for temperature in (1.0, 2.0):
                    for write_grad in write_grads:
                        # Block launches (trial packs) at the paper's shapes: blocks of m nodes.
                        for gather in ((False, True) if (b, c) in _PAPER else (False,)):
                            for kernel, sig, const, warps in _kernel_sets(dtype, m, b, c, temperature, write_grad,
                                                                          gather):
                                key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())),
                                       warps)
                                seen.setdefault(key, (kernel, sig, const, warps))
    return list(seen.values())


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _build(kernel, sig: dict, const: dict, warps: int, capability: int) -> Build:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**sig, **{k: "constexpr" for k in const}}
    src = ASTSource(fn=kernel, signature=signature, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    # The cubin's resource usage: registers, and the stack frame / local memory that spills live in.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        r = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True)
    use = _USAGE.search(r.stdout)
    if use is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel.__name__}: {r.stdout[-500:]}")
    regs, stack, shared, local = map(int, use.groups())
    dtype = sig.get("logits_ptr", sig.get("src_ptr", "?")).lstrip("*")
    return Build(kernel.__name__, dtype, tuple(sorted(const.items())), warps, regs, stack, local, shared)


def compile_all(capability: int = 90, configs: Optional[list[tuple]] = None, jobs: int = 1) -> list[Build]:
    """Build every configuration for ``capability``; returns one :class:`Build` each.

    Raises RuntimeError when the backend cannot build here (see :func:`backend_status`).
    """
    ok, why = backend_status(capability)
    if not ok:
        raise RuntimeError(why)
    configs = configurations() if configs is None else configs
    if jobs <= 1:
        return [_build(*cfg, capability) for cfg in configs]
    from concurrent.futures import ProcessPoolExecutor

    jobs_args = [(k.__name__, s, c, w, capability) for k, s, c, w in configs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_build_by_name, jobs_args, chunksize=8))


def _build_by_name(args: tuple) -> Build:
    from . import _triton_graph_loss as K

    name, sig, const, warps, capability = args
    return _build(getattr(K, name), sig, const, warps, capability)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktg_fast.kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--capability", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    p.add_argument("--json", action="store_true", help="print one JSON record per build instead of a table")
    p.add_argument("--all-m", action="store_true", help="every M from 1 to 16 and the no-gradient forward too")
    a = p.parse_args(argv)
    ok, why = backend_status(a.capability)
    if not ok:
        print(f"cannot build for sm_{a.capability}: {why}", file=sys.stderr)
        return 3
    configs = configurations(range(1, 17), write_grads=(True, False)) if a.all_m else configurations()
    builds = compile_all(a.capability, configs, jobs=a.jobs)
    if a.json:
        for bld in builds:
            print(json.dumps({**asdict(bld), "constants": dict(bld.constants)}))
        return 0
    print(f"{len(builds)} kernel builds for sm_{a.capability} (Triton {triton.__version__})")
    print(f"{'kernel':<20} {'dtype':<5} {'warps':>5} {'regs':>5} {'stack':>6} {'smem':>6}  constants")
    for bld in sorted(builds, key=lambda x: (x.kernel, -x.registers)):
        short = {k: v for k, v in bld.constants if k in ("M", "BLOCK_C", "ROWS", "NSPLIT", "WRITE_GRAD", "SAME_T",
                                                          "IN_PLACE", "COUNT_IN_KERNEL", "GATHER")}
        print(f"{bld.kernel:<20} {bld.dtype:<5} {bld.num_warps:>5} {bld.registers:>5} {bld.spills:>6} "
              f"{bld.shared_bytes:>6}  {short}")
    spilled = [b for b in builds if b.spills > SPILL_TOLERANCE_BYTES]
    print(f"max registers/thread: {max(b.registers for b in builds)}; builds with spills over "
          f"{SPILL_TOLERANCE_BYTES} bytes: {len(spilled)}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
