"""``--sync-bn``: BatchNorm over the global batch of a data-parallel run, inside vmapped node groups too.

``torch.nn.SyncBatchNorm`` runs on CUDA only and not under ``vmap``, and a fused
node group runs its K nets' BatchNorm layers as one vmapped op.  This module's
:class:`SyncBatchNorm` computes the same thing for a tensor with or without a
leading node dimension: per channel (per node), each rank's count, mean and sum of
squared deviations are gathered in **one** collective per layer (for the whole
group) and combined exactly (Chan et al.'s pairwise formula); the backward sums
``dy`` and ``dy * x_hat`` over the ranks in one all-reduce.  The running
statistics take the global mean and the unbiased global variance, as one process
on the global batch would.  Under ``vmap`` the function's vmap rule moves the node
dimension to the front and runs once for the group (see ``torch.autograd.Function``'s
``vmap`` staticmethod).  In eval mode it is plain BatchNorm on running statistics.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _reduce_dims(x: torch.Tensor, lead: int) -> list[int]:
    # x: (*lead, N, C, *spatial): reduce over N and the spatial dims.
    return [lead] + list(range(lead + 2, x.dim()))


def _per_channel(t: torch.Tensor, x: torch.Tensor, lead: int) -> torch.Tensor:
    """(*lead, C) -> broadcastable against x (*lead, N, C, *spatial)."""
    shape = list(t.shape[:lead]) + [1, t.shape[lead]] + [1] * (x.dim() - lead - 2)
    return t.reshape(shape)


class _SyncBatchNormFn(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the global batch; also returns (mean, var, count)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                lead: int):
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        dims = _reduce_dims(xf, lead)
        n_local = float(xf.numel() // (math.prod(xf.shape[:lead]) * xf.shape[lead + 1]))  # rows x spatial
        mean_l = xf.mean(dims)
        m2_l = ((xf - _per_channel(mean_l, xf, lead)) ** 2).sum(dims)
        count_l = torch.full_like(mean_l, n_local)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            mine = torch.stack([count_l, mean_l, m2_l])  # (3, *lead, C): one gather for the layer
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine.contiguous())
            allp = torch.stack(parts)  # (W, 3, *lead, C)
            counts, means, m2s = allp[:, 0], allp[:, 1], allp[:, 2]
            count = counts.sum(0)
            mean = (counts * means).sum(0) / count
            m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        else:
            count, mean, m2 = count_l, mean_l, m2_l
        var = m2 / count
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - _per_channel(mean, xf, lead)) * _per_channel(invstd, xf, lead)
        y = xhat
        if weight is not None:
            y = y * _per_channel(weight.to(dtype), xf, lead)
        if bias is not None:
            y = y + _per_channel(bias.to(dtype), xf, lead)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, eps, lead = inputs
        _, mean, var, count = output
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps, ctx.lead, ctx.has_bias = eps, lead, bias is not None
        ctx.mark_non_differentiable(mean, var, count)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, *_unused: Any):
        x, weight, mean, var, count = ctx.saved_tensors
        lead = ctx.lead
        dtype = mean.dtype
        xf, g = x.to(dtype), gy.to(dtype)
        dims = _reduce_dims(xf, lead)
        invstd = torch.rsqrt(var + ctx.eps)
        xhat = (xf - _per_channel(mean, xf, lead)) * _per_channel(invstd, xf, lead)
        sum_dy_l = g.sum(dims)
        sum_dy_xhat_l = (g * xhat).sum(dims)
        sums = torch.stack([sum_dy_l, sum_dy_xhat_l])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # one collective: the global sums the normalisation's gradient needs
        sum_dy, sum_dy_xhat = sums[0], sums[1]
        scale = invstd if weight is None else invstd * weight.to(dtype)
        gx = _per_channel(scale, xf, lead) * (g - _per_channel(sum_dy / count, xf, lead)
                                               - xhat * _per_channel(sum_dy_xhat / count, xf, lead))
        # Parameter gradients from this rank's rows: the run's gradient sync sums them over the ranks.
        gw = sum_dy_xhat_l.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_dy_l.to(weight.dtype if weight is not None else dtype) if ctx.has_bias and ctx.needs_input_grad[2] \
            else None
        return gx.to(x.dtype), gw, gb, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x, weight, bias, eps, lead):
        # The node dimension becomes a real leading dimension: one call (one collective) for the group.
        k = info.batch_size

        def front(t: Optional[torch.Tensor], d: Optional[int]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            return t.movedim(d, 0) if d is not None else t.expand(k, *t.shape)

        y, mean, var, count = _SyncBatchNormFn.apply(front(x, in_dims[0]), front(weight, in_dims[1]),
                                                     front(bias, in_dims[2]), eps, lead + 1)
        return (y, mean, var, count), (0, 0, 0, 0)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of every rank (training); running statistics in eval mode.

    Same parameters, buffers and ``state_dict`` keys as ``nn.BatchNorm2d`` (checkpoints load either way);
    input (N, C, *) of any rank >= 2.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        y, mean, var, count = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps, 0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # a cumulative moving average
                    factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
                else:
                    factor = self.momentum
                n = count
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        return y


def convert_sync_batchnorm(net: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``net`` by :class:`SyncBatchNorm`, in place, sharing its tensors
    (the same Parameter and buffer objects, so views taken later still see them); returns ``net``."""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
            new = SyncBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                track_running_stats=child.track_running_stats)
            new._parameters = child._parameters
            new._buffers = child._buffers
            new.train(child.training)
            setattr(net, name, new)
        else:
            convert_sync_batchnorm(child)
    return net
