"""Triton kernels of ktg_fast (installed as ``ktg_fast.kernels``; never a top-level module).

The fused graph loss::

    from ktg_fast.kernels import graph_loss_triton, is_available
    node_loss, edge_loss = graph_loss_triton(logits, labels, gate_codes, temperature, progress)
    # a trial pack: NB blocks of m nodes, no edge between them, one launch (NB * m^2 pairs per row)
    node_loss, edge_loss = graph_loss_triton_blocks(logits, labels, block_codes, block_nodes, temperature, progress)

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before this package is first imported,
since Triton decides how to build a kernel when it is defined.
"""
from .graph_loss import (graph_loss_triton, graph_loss_triton_blocks, graph_loss_triton_blocks_with_grad,
                         graph_loss_triton_with_grad)
from .launch import MAX_NODES, Plan, grad_dtype, interpreter_problem, is_available, plan

__all__ = ["MAX_NODES", "Plan", "grad_dtype", "graph_loss_triton", "graph_loss_triton_with_grad",
           "graph_loss_triton_blocks", "graph_loss_triton_blocks_with_grad", "interpreter_problem", "is_available",
           "plan"]
