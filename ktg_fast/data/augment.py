"""Batched random crop (with reflection padding) and horizontal flip.

Padding is folded into the gather: output pixel (i, j) of sample b reads source pixel
(reflect(i + oy_b - pad), reflect(j' + ox_b - pad)) where j' = W-1-j when sample b is flipped.
So one ``gather`` with per-sample index grids produces the whole augmented batch, on any device
and dtype, with no padded copy, no Python loop over samples and no per-shift masks. ``reflect`` is numpy's
``mode="reflect"`` (edge not repeated), i.e. torch's ``"reflect"`` and DALI's ``"reflect_101"``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def reflect_coords(coords: Tensor, size: int) -> Tensor:
    """Map coordinates in [-(size-1), 2*size-2] into [0, size) by reflection about the edges."""
    c = coords.abs()
    return torch.where(c > size - 1, 2 * (size - 1) - c, c)


def _check_pad(pad: int, h: int, w: int) -> None:
    if pad < 0 or pad >= min(h, w):
        raise ValueError(f"reflection pad must be in [0, {min(h, w) - 1}] for {h}x{w} images "
                         f"(numpy/torch 'reflect' needs pad < size); got {pad}")


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """Pad the last two dims by ``pad`` with numpy's ``mode="reflect"`` (any dtype/device)."""
    h, w = x.shape[-2:]
    _check_pad(pad, h, w)
    rows = reflect_coords(torch.arange(-pad, h + pad, device=x.device), h)
    cols = reflect_coords(torch.arange(-pad, w + pad, device=x.device), w)
    return x[..., rows[:, None], cols]


def crop_flip_grids(offsets: Tensor, flips: Tensor, height: int, width: int,
                    pad: int) -> tuple[Tensor, Tensor]:
    """Per-sample source rows (B, H) and columns (B, W) of a crop at ``offsets`` of the padded
    image, followed by a horizontal flip where ``flips`` is true."""
    dev = offsets.device
    i = torch.arange(height, device=dev)
    j = torch.arange(width, device=dev)
    rows = offsets[:, :1] - pad + i
    jj = torch.where(flips[:, None], width - 1 - j, j)
    cols = offsets[:, 1:] - pad + jj
    return reflect_coords(rows, height), reflect_coords(cols, width)


def gather_crops(src: Tensor, rows: Tensor, cols: Tensor, samples: Tensor | None = None) -> Tensor:
    """``out[b, c, i, j] = src[samples[b], c, rows[b, i], cols[b, j]]``.

    ``samples`` (B,) picks images from ``src`` (default: all of ``src``, in order), so a loader
    selects its batch from the stored split and augments it in two ops: an ``index_select`` of
    whole images and one ``gather`` over the flattened pixels (faster than 4-index advanced
    indexing on CPU and GPU alike).
    """
    x = src if samples is None else src.index_select(0, samples)
    b, c, h, w = x.shape
    if rows.shape != (b, h) or cols.shape != (b, w):
        raise ValueError(f"rows/cols must be ({b}, {h}) and ({b}, {w}) for a batch of shape "
                         f"{tuple(x.shape)}; got {tuple(rows.shape)} and {tuple(cols.shape)}")
    lin = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, lin).view(b, c, h, w)


def sample_crop_flip(batch: int, pad: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Random offsets (B, 2) in [0, 2*pad] and flips (B,) bool, drawn on the generator's device."""
    gdev = generator.device if generator is not None else device
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=gdev)
    flips = torch.randint(0, 2, (batch,), generator=generator, device=gdev).bool()
    return offsets, flips


def random_crop_flip(x: Tensor, pad: int = 4, generator: torch.Generator | None = None,
                     offsets: Tensor | None = None, flips: Tensor | None = None) -> Tensor:
    """Reflection-pad by ``pad``, crop each sample back to HxW at its own random offset, and flip
    each sample horizontally with probability 1/2.

    Args:
        x: (B, C, H, W) tensor of any dtype, on any device; the result stays there.
        pad: padding per side; offsets are drawn uniformly from [0, 2*pad] per axis.
        generator: random source (default: torch's global RNG for ``x.device``).
        offsets: force the crop: (B, 2) integer (row, column) offsets in the padded image.
        flips: force the flips: (B,) bool.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects (B, C, H, W); got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    _check_pad(pad, h, w)
    if offsets is None or flips is None:
        r_off, r_flip = sample_crop_flip(b, pad, generator, x.device)
        offsets = r_off if offsets is None else offsets
        flips = r_flip if flips is None else flips
    offsets = offsets.to(x.device, torch.int64)
    flips = flips.to(x.device, torch.bool)
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(f"offsets must be ({b}, 2) and flips ({b},); got {tuple(offsets.shape)} "
                         f"and {tuple(flips.shape)}")
    if offsets.device.type == "cpu" and b and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * pad):
        raise ValueError(f"offsets must lie in [0, {2 * pad}] (= 2*pad)")
    rows, cols = crop_flip_grids(offsets, flips, h, w, pad)
    return gather_crops(x, rows, cols)
