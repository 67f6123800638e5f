"""Memory savings that compute exactly what space/model.py writes plainly.

Activation checkpointing drops a stretch of layers' activations after the forward pass and recomputes them
in the backward pass. BatchNorm needs care there: a recomputed layer must normalise by the same batch
statistics without updating its running statistics twice, and a batch processed in chunks (or split over
data-parallel ranks) must be normalised by the statistics of the whole batch. Everything here is tested
against the plain computation, values and gradients.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# Set while torch.utils.checkpoint recomputes a stretch of layers in the backward pass: BatchNorm then
# normalises by the batch statistics again but leaves its running statistics alone (they were updated once,
# in the forward pass).
_recomputing = [0]


def full_precision(t):
    """t in float32 if autocast made it bf16 or fp16 (train.amp), else as it is (float64 tests stay float64)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@contextlib.contextmanager
def _recompute_context():
    _recomputing[0] += 1
    try:
        yield
    finally:
        _recomputing[0] -= 1


def _recompute_contexts():
    return contextlib.nullcontext(), _recompute_context()


def checkpointed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_recompute_contexts)


def in_chunks(fn, x, rows: int, *args) -> list:
    """fn(x, *args) over chunks of `rows` rows of x, for a fn that works row by row, each chunk's activations
    dropped after the forward pass and recomputed in the backward pass (with the same random draws:
    checkpoint restores the RNG state). One part, fn(x, *args) itself, when rows is 0, gradients are off or
    x fits in one chunk. Returns the chunks' outputs in order."""
    if not (rows and torch.is_grad_enabled() and x.shape[0] > rows):
        return [fn(x, *args)]
    return [checkpointed(fn, xc, *args) for xc in x.split(rows)]


def join_chunks(parts: list) -> dict:
    """The outputs (dicts) of chunks of a batch, in order -> the batch's: tensors concatenated along the
    batch, counts ("glimpses_decoded") summed."""
    return {k: sum(p[k] for p in parts) if k == "glimpses_decoded" else torch.cat([p[k] for p in parts])
            for k in parts[0]}


def run_keeping_conv_outputs(layers, h):
    """Apply a chain of layers to h, keeping for the backward pass only the convolutions' outputs.

    What lies between two convolutions (normalisation, activation, pixel shuffle) is cheap to recompute
    but stores one or two full-size tensors for the backward pass. Each such stretch runs under activation
    checkpointing together with the convolution after it, whose saved input is the last thing recomputed:
    the recomputation stops there (torch's early stop), so no convolution runs twice. Exact: the same
    operations on the same values (tested against the plain chain, with gradients).
    """
    if not (torch.is_grad_enabled() and h.requires_grad):
        for layer in layers:
            h = layer(h)
        return h
    segment = []
    for layer in layers:
        segment.append(layer)
        if isinstance(layer, nn.Conv2d):
            h = _run_segment(segment, h)
            segment = []
    return _run_segment(segment, h) if segment else h


def _run_segment(segment, h):
    def run(h):
        for layer in segment:
            h = layer(h)
        return h

    if len(segment) == 1:  # a lone convolution stores only its input, which is stored anyway
        return run(h)
    return checkpointed(run, h)


def leaf_layers(module: nn.Module) -> list:
    """The layers of nested Sequentials, in order."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in leaf_layers(child)]
    return [module]


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics span every data-parallel rank, on CPU (gloo) as on GPU.

    Under DDP each rank holds a slice of the global batch; normalising each slice by its own statistics
    would make N ranks train a different model from one process with N times the batch. The sums are
    all-reduced with the autograd-aware collective, so the backward pass is synchronised too.
    (torch.nn.SyncBatchNorm does the same on GPUs only.)
    """

    def forward(self, x):
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            if self.training and _recomputing[0]:  # the same call, with throwaway running statistics
                return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight,
                                    self.bias, True, self.momentum or 0.0, self.eps)
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), x.numel() // c)
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))  # (2C + 1,)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased: what BatchNorm normalises by
        if not _recomputing[0]:  # a recomputation in the backward pass leaves the running statistics alone
            update_running_stats(self, mean, var, n)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


def update_running_stats(bn: nn.BatchNorm2d, mean, var, n) -> None:
    """nn.BatchNorm2d's update of its running statistics from a batch's mean and biased variance over n
    values (the running variance is unbiased, as torch keeps it)."""
    with torch.no_grad():
        bn.num_batches_tracked += 1
        m = bn.momentum if bn.momentum is not None else 1 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(m * mean.detach())
        bn.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))


def _ddp_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _NormaliseWith(torch.autograd.Function):
    """BatchNorm's affine normalisation of h (m, C, H, W) by given statistics mean, var (C,), with the
    gradients to h, mean, var, weight and bias. Forward and backward are each one fused pass of torch's
    batch-norm kernels in inference form; the gradients to mean and var (which the inference form
    treats as constants) follow from its dbias and dweight:
        dL/dmean = -dbias * weight / sqrt(var + eps)
        dL/dvar  = -dweight * weight / (2 (var + eps))      where dweight = sum(dy * (h - mean) / sqrt(var + eps))
    Autograd of the unfused formula gives the same values in five times the memory traffic."""

    @staticmethod
    def forward(ctx, h, mean, var, weight, bias, eps):
        ctx.save_for_backward(h, mean, var, weight)
        ctx.eps = eps
        return torch.batch_norm(h, weight, bias, mean, var, False, 0.0, eps, True)

    @staticmethod
    def backward(ctx, dy):
        h, mean, var, weight = ctx.saved_tensors
        dh, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, h, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        inv = torch.rsqrt(var + ctx.eps)
        dmean = -dbias * weight * inv
        dvar = -dweight * weight * inv * inv / 2
        return dh, dmean, dvar, dweight, dbias, None


def bn_apply(h, mean, var, bn: nn.BatchNorm2d):
    """BatchNorm's affine normalisation of h (m, C, H, W) with given statistics (C,) each."""
    return _NormaliseWith.apply(h, mean, var, bn.weight, bn.bias, bn.eps)


class _ChunkStats(torch.autograd.Function):
    """(mean, biased var), (C,) each, of h (m, C, H, W) over all but the channels; the backward pass is
    one fused multiply-add, dh = dmean / n + dvar * 2 (h - mean) / n, instead of autograd's five passes."""

    @staticmethod
    def forward(ctx, h):
        # In float32 whatever h's dtype: bf16 statistics would lose the variance to rounding, and
        # BatchNorm's mixed-dtype kernels want float32 statistics beside a bf16 input (train.amp).
        # batch_norm_update_stats: BatchNorm's own statistics kernel, 13x faster than var_mean over (0, 2, 3)
        # on channels_last maps here (1.7 against 21 ms for 10x32x132x132); it returns the biased variance.
        mean, var = torch.batch_norm_update_stats(full_precision(h), None, None, 0.0)
        ctx.save_for_backward(h, mean)
        return mean, var

    @staticmethod
    def backward(ctx, dmean, dvar):
        h, mean = ctx.saved_tensors
        n = h.numel() // h.shape[1]
        if dmean is None:
            dmean = torch.zeros_like(mean)
        if dvar is None:
            dvar = torch.zeros_like(mean)
        slope = 2 * dvar / n  # (C,)
        shape = (1, -1, 1, 1)
        return torch.addcmul((dmean / n - slope * mean).view(shape), h, slope.view(shape)).to(h.dtype)


def combine_stats(parts: list, bn: nn.BatchNorm2d):
    """BatchNorm's training statistics of a batch held in parts: parts[j] = (count, mean (C,), biased var
    (C,)) of part j. Exact (the parallel form of the variance: within-part plus between-part spread, no
    E[x^2] - E[x]^2 cancellation) and differentiable; under DDP the parts span every rank. BatchNorm's
    running statistics are updated once, as nn.BatchNorm2d does; returns (mean, var), (C,) each."""
    count = sum(n for n, _, _ in parts)
    total = sum(n * m for n, m, _ in parts)  # (C,)
    world = _ddp_world()
    if world > 1:
        from torch.distributed.nn.functional import all_reduce

        reduced = all_reduce(torch.cat([total, total.new_tensor([float(count)])]))
        total, count = reduced[:-1], reduced[-1]
    mean = total / count
    spread = sum(n * (v + (m - mean) ** 2) for n, m, v in parts)  # (C,)
    if world > 1:
        spread = all_reduce(spread)
    var = spread / count
    if bn.training and bn.track_running_stats and not _recomputing[0]:
        update_running_stats(bn, mean, var, count)
    return mean, var


def chunk_stats(h):
    """(count, mean (C,), biased var (C,)) of one chunk h (m, C, H, W), for combine_stats."""
    mean, var = _ChunkStats.apply(h)
    return h.shape[0] * h.shape[2] * h.shape[3], mean, var


def sum_over_rows(t):
    """t (M, C, H, W) summed over its rows M -> (1, C, H, W). On channels_last maps torch's sum over dim 0
    took 40x a flat reduction here (508 ms against 12 ms for 80x32x134x134 float32), so each layout is
    summed as the flat rows it is stored as."""
    m, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(m, -1).sum(0).view(1, h, w, c).permute(0, 3, 1, 2)
    if t.is_contiguous():
        return t.reshape(m, -1).sum(0).view(1, c, h, w)
    return t.sum(0, keepdim=True)


class _BroadcastAdd(torch.autograd.Function):
    """z_part (M, C) at every pixel plus coord_part (1, C, H, W) -> (M, C, H, W): the spatial broadcast's
    first layer. Its backward sums the gradient over M with `sum_over_rows`, not with autograd's own sum over
    dim 0, which is slow on channels_last maps."""

    @staticmethod
    def forward(ctx, z_part, coord_part):
        return z_part[:, :, None, None] + coord_part

    @staticmethod
    def backward(ctx, dy):
        return dy.sum((2, 3)), sum_over_rows(dy)


def broadcast_add(z_part, coord_part):
    """z_part (M, C), coord_part (1, C, H, W) -> z_part[:, :, None, None] + coord_part, (M, C, H, W)."""
    return _BroadcastAdd.apply(z_part, coord_part)


def broadcast_decode(net, coords, z, rows: int = 0):
    """space.model.CompDecoder's spatial broadcast, net(z tiled beside coords), without the tiled input.
    net's first convolution is unpadded, so z's part of its output is the same at every pixel: (its weights
    summed over the kernel) @ z. z (M, Dc), coords (1, 2, N+8, N+8) -> component means (M, 3, N, N).
    rows > 0: the layers after the first run in chunks of that many maps (`broadcast_decode_in_chunks`)."""
    conv = net[0][0]
    d = z.shape[1]
    z_part = z @ conv.weight[:, :d].sum((2, 3)).t()  # (M, 32)
    coord_part = F.conv2d(coords, conv.weight[:, d:], conv.bias)  # (1, 32, N+6, N+6)
    if rows:
        return broadcast_decode_in_chunks(net, z_part, coord_part, rows)  # the same, in less memory
    h = broadcast_add(z_part, coord_part)  # (M, 32, N+6, N+6)
    for layer in leaf_layers(net)[1:]:  # BatchNorm, ELU, then the other convolutions
        h = layer(h)
    return torch.sigmoid(h)


def broadcast_decode_in_chunks(net, z_part, coord_part, rows: int):
    """`broadcast_decode`'s layers after the first convolution, for less memory: the M maps go through
    each layer in chunks of `rows`. z_part (M, 32) and coord_part (1, 32, N+6, N+6) are the first
    convolution's output split as `broadcast_decode` computes it; returns the component means (M, 3, N, N).

    Each BatchNorm still normalises by the statistics of all M maps (`combine_stats`, exact), so only
    the layer-to-layer convolution outputs are kept, chunk by chunk, and the backward pass works on one
    chunk's activations at a time instead of all M (184 MB a tensor for 3D-Room at batch 16). Nothing
    but BatchNorm and ELU is recomputed (tested against the plain pass with gradients).
    """
    *blocks, out = net  # blocks of (conv, BatchNorm, ELU); the first conv is z_part + coord_part
    bns = [blk[1] for blk in blocks]
    convs = [blk[0] for blk in blocks[1:]] + [out]  # the convolution after each BatchNorm and ELU
    bn0, conv1 = bns[0], convs[0]

    # The first layer's input zp_i + cp_p over rows i and pixels p is never built whole: its mean is
    # mean(zp) + mean(cp) and its variance var(zp) + var(cp), exactly.
    var_z, mean_z = torch.var_mean(full_precision(z_part), dim=0, correction=0)  # (32,) each, float32 (_ChunkStats)
    var_c, mean_c = torch.var_mean(full_precision(coord_part), dim=(0, 2, 3), correction=0)
    count = z_part.shape[0] * coord_part.shape[2] * coord_part.shape[3]
    mean, var = combine_stats([(count, mean_z + mean_c, var_z + var_c)], bn0)
    # BatchNorm's affine map goes into the two parts, so the normalised input is one broadcast add per chunk:
    # bn0(zp_i + cp_p) = scale (zp_i + cp_p - mean) + bias = [scale (zp_i - mean) + bias] + [scale cp_p].
    scale = bn0.weight * torch.rsqrt(var + bn0.eps)  # (32,)
    z_norm = ((z_part - mean) * scale + bn0.bias).to(z_part.dtype)  # (M, 32)
    coord_norm = (coord_part * scale.view(1, -1, 1, 1)).to(coord_part.dtype)  # (1, 32, N+6, N+6)

    # ELU in place: neither the broadcast add nor bn_apply keeps its output for the backward pass, so it
    # can be overwritten, which saves a map-sized allocation and pass per chunk.
    def first(zn, cn):
        return conv1(F.elu(broadcast_add(zn, cn), inplace=True))

    def block(conv, bn):
        return lambda h, mean, var: conv(F.elu(bn_apply(h, mean, var, bn), inplace=True))

    h = [checkpointed(first, zn, coord_norm) for zn in z_norm.split(rows)]  # (m, 32, ., .)
    for conv, bn in zip(convs[1:], bns[1:]):
        mean, var = combine_stats([chunk_stats(x) for x in h], bn)
        h = [checkpointed(block(conv, bn), x, mean, var) for x in h]
    return torch.sigmoid(torch.cat(h))  # (M, 3, N, N)


def forward_backward_in_chunks(model, x, step: int, images: int, forward_context=contextlib.nullcontext) -> dict:
    """model(x, step) and the backward pass of its loss, with the foreground taken `images` images at a time:
    each chunk's foreground goes forward and, at once, backward, so its activations are held one chunk at a
    time and computed once, where `in_chunks` computes them twice. Exact: the loss is a mean over images of
    per-image objectives, and the foreground works image by image; only the background, whose BatchNorm
    statistics span the batch, is computed for the whole batch, forward first and backward last, from the
    gradients the chunks left on its outputs. The random draws come in the same order as model(x, step)'s
    with `in_chunks` (the background's, then each chunk's). Leaves the gradients in the parameters' .grad
    and returns model(x, step)'s output, detached. x (B, 3, N, N). `forward_context()` is entered around
    each forward piece and left for the backward passes (train.amp's autocast wraps forward passes only)."""
    b = x.shape[0]
    with forward_context():
        bg = model.bg(x)  # the whole batch
    # Each chunk's rows of the background's outputs as leaves of its own: the chunk's backward pass stops
    # there and leaves its gradient, (images, ...) per output, gathered for the background's backward pass.
    needs_grad = [k for k, v in bg.items() if torch.is_tensor(v) and v.requires_grad]
    priors = model.fg_schedules(step)
    parts, leaves, start = [], [], 0
    for xc in x.split(images):
        stop = start + xc.shape[0]
        bg_c = {k: v[start:stop].detach() if torch.is_tensor(v) else v for k, v in bg.items()}
        for k in needs_grad:
            bg_c[k].requires_grad_()
        with forward_context():
            fg = model.fg.infer(xc, *priors)  # this chunk's foreground forward, its activations kept
            out = model.assemble(xc, bg_c, fg, step)
        (out["per_image"]["loss"].sum() / b).backward()  # this chunk's share of the batch's mean loss
        parts.append(_detached(out))
        leaves.append(bg_c)
        start = stop
    used = [k for k in needs_grad if all(c[k].grad is not None for c in leaves)]
    torch.autograd.backward([bg[k] for k in used],  # the background's backward pass
                            [torch.cat([c[k].grad for c in leaves]) for k in used])

    per_image = join_chunks([p["per_image"] for p in parts])  # (B,) each
    return {
        **{k: torch.cat([p[k] for p in parts]) for k in ("recon", "mse", "objective", "bg_image", "pi")},
        "terms": {k: v.mean() for k, v in per_image.items()},
        "per_image": per_image,
        "fg": join_chunks([p["fg"] for p in parts]),
        "bg": _detached(bg),
    }


def _detached(out):
    """A model output (nested dicts of tensors and numbers) with every tensor detached from the graph."""
    if isinstance(out, dict):
        return {k: _detached(v) for k, v in out.items()}
    return out.detach() if torch.is_tensor(out) else out
