"""MoCo encoder pair with a key queue (no loss math here: see pcl.loss).

Parameter names follow the official code (``encoder_q.*``, ``encoder_k.*``, ``queue`` of shape C x r,
``queue_ptr``), so checkpoints stay readable by the official PCL/MoCo evaluation scripts.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet

from pcl import PCLError, distributed as dist_utils

logger = logging.getLogger("pcl")


def _resnet_factory(arch: str):
    """The torchvision builder of ``arch``: only the public model builders (resnet18..resnet152, resnext*,
    wide_resnet*), never a module helper such as ``_resnet`` or the ``ResNet`` class."""
    names = sorted(n for n in getattr(tv_resnet, "__all__", dir(tv_resnet))
                   if n.islower() and not n.startswith("_") and "resne" in n and callable(getattr(tv_resnet, n, None)))
    if arch not in names:
        raise PCLError(f"unknown architecture '{arch}': choose a torchvision ResNet ({', '.join(names)})")
    return getattr(tv_resnet, arch)


def build_backbone(arch: str = "resnet50", width: int = 64, stem: str = "standard") -> nn.Module:
    """A torchvision ResNet whose ``fc`` is Identity: returns pooled features B x d.

    width: channels of the first stage (64 reproduces torchvision exactly; the stages keep the 1:2:4:8
    ratios). stem 'small': 3x3 conv stride 1 and no max-pool, for 32-96 px images.
    """
    model = _resnet_factory(arch)(weights=None)
    if width != 64:
        block = type(model.layer1[0])
        layers = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
        model.inplanes = width
        model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        model.layer1 = model._make_layer(block, width, layers[0])
        for i, mult in ((2, 2), (3, 4), (4, 8)):
            setattr(model, f"layer{i}", model._make_layer(block, width * mult, layers[i - 1], stride=2))
        model.fc = nn.Linear(width * 8 * block.expansion, 1)
        for m in model.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    if stem == "small":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif stem != "standard":
        raise PCLError(f"unknown stem '{stem}': use standard or small")
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def projection_head(in_dim: int, out_dim: int, mlp: bool) -> nn.Module:
    """v1: Linear(d, out). v2 (mlp): Linear(d, d)-ReLU-Linear(d, out) (keys fc.0 / fc.2, as official)."""
    if mlp:
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    return nn.Linear(in_dim, out_dim)


def build_encoder(arch: str, dim: int, mlp: bool, width: int = 64, stem: str = "standard") -> nn.Module:
    """Backbone with the projection head as its ``fc``: the official module layout, built in one place."""
    encoder = build_backbone(arch, width, stem)
    encoder.fc = projection_head(encoder.feature_dim, dim, mlp)
    return encoder


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from ``num_splits`` interleaved sub-batches.

    The single-device stand-in for MoCo's shuffle-BN over a node's GPUs: with the key batch shuffled, the
    query's and the key's BN statistics come from different samples, so BN cannot leak the positive.
    Evaluation is plain BatchNorm; parameters and buffers have BatchNorm2d's names and shapes.
    """

    def __init__(self, num_features: int, num_splits: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.num_splits:
            raise PCLError(f"batch of {n} is not divisible by --bn-splits {self.num_splits}")
        if n // self.num_splits * h * w == 1:
            raise PCLError(f"--bn-splits {self.num_splits} with a batch of {n} leaves one sample per split on a "
                           f"{h}x{w} feature map: BatchNorm needs more than one value per channel; lower --bn-splits "
                           f"or raise the batch size (--batch-size)")
        if self.num_splits == 1:
            return super().forward(x)
        with torch.no_grad():
            self.num_batches_tracked += 1  # first, as nn.BatchNorm: momentum None averages over it
        factor = self._average_factor()
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return self._forward_channels_last(x, factor)
        s = self.num_splits
        mean_split = self.running_mean.repeat(s)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(-1, c * s, h, w), mean_split, var_split, self.weight.repeat(s),
                           self.bias.repeat(s), True, factor, self.eps).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(s, c).mean(dim=0))
            self.running_var.copy_(var_split.view(s, c).mean(dim=0))
        return out

    def _average_factor(self) -> float:
        """The running-average weight, as nn.BatchNorm: ``momentum``, or 1 / num_batches_tracked (a cumulative
        mean) when momentum is None -- F.batch_norm takes a float only, so that case reads the counter (a host
        sync on a GPU, as in nn.BatchNorm; the default momentum 0.1 has none)."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _forward_channels_last(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        """The training forward for a channels-last (NHWC) input, returning NHWC.

        Why not the NCHW path's reshape: with NHWC strides ``x.reshape(-1, C*s, H, W)`` is not a view, so it
        copies the batch to NCHW and returns NCHW; on a GPU each BatchNorm would then pay two layout copies and
        hand the next conv an NCHW tensor, which cudnn converts back to NHWC (more transposes, and the NHWC
        tensor-core kernels that --channels-last is for are lost). Here the split is a view that moves no
        memory, the statistics are a reduction over it and the normalisation is one broadcast multiply-add,
        which keeps the input's strides. Same numbers as the NCHW path up to float rounding (~1e-6).
        """
        n, c, h, w = x.shape
        s = self.num_splits
        count = n // s * h * w  # values per (split, channel): > 1, forward checked it
        x5 = x.view(n // s, s, c, h, w)  # N/s x s x C x H x W: sample i in split i % s; a view for NHWC strides
        var, mean = _SplitMoments.apply(x5)  # s x C each, float32 (biased: normalisation)
        scale = self.weight * torch.rsqrt(var + self.eps)  # s x C
        shift = self.bias - mean * scale  # s x C
        out = torch.addcmul(shift.to(x.dtype)[:, :, None, None], x5, scale.to(x.dtype)[:, :, None, None])
        with torch.no_grad():  # as F.batch_norm on the s repeated copies: per split, unbiased var, then the mean
            var_unbiased = var * (count / (count - 1))  # s x C
            self.running_mean.copy_(((1 - factor) * self.running_mean + factor * mean).mean(dim=0))
            self.running_var.copy_(((1 - factor) * self.running_var + factor * var_unbiased).mean(dim=0))
        return out.view(n, c, h, w)  # N x C x H x W with x's NHWC strides (view: no copy)


class _SplitMoments(torch.autograd.Function):
    """(biased variance, mean) over dims (0, 3, 4) of an N/s x s x C x H x W view, in float32 whatever its dtype.

    Under --amp fp16 the activations are float16: ``torch.var_mean`` on them returns float16, whose largest
    value is 65504, so activations of std ~ 256 and above give an infinite variance (and bfloat16 keeps only 8
    bits of it). Here the moments are reduced from a float32 copy that lives only inside each pass: the input
    itself is what is kept for the backward (the scale-and-shift keeps it anyway), not a float32 copy of it."""

    @staticmethod
    def forward(ctx, x5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        var, mean = torch.var_mean(x5.float(), dim=(0, 3, 4), unbiased=False)  # s x C each
        ctx.save_for_backward(x5, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
        x5, mean = ctx.saved_tensors
        count = x5.numel() // mean.numel()  # values per (split, channel)
        centred = x5.float() - mean[None, :, :, None, None]
        grad = (centred * (2.0 * grad_var[None, :, :, None, None]) + grad_mean[None, :, :, None, None]) / count
        return grad.to(x5.dtype)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d by a SplitBatchNorm that keeps its state (in place, returns module)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            new = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_split_bn(child, num_splits)
    return module


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of r normalised keys (He et al. 2020; PCL's base).

    ``forward(im_q, im_k)`` updates the key encoder, encodes both views and returns (q, k), each B x dim
    and L2-normalised; the caller builds the losses and then calls :meth:`dequeue_and_enqueue`.
    """

    def __init__(self, arch: str = "resnet50", dim: int = 128, r: int = 16384, m: float = 0.999,
                 mlp: bool = False, width: int = 64, stem: str = "standard", bn_splits: int = 1) -> None:
        super().__init__()
        self.r, self.m, self.bn_splits = r, m, bn_splits
        self.encoder_q = build_encoder(arch, dim, mlp, width, stem)
        self.encoder_k = build_encoder(arch, dim, mlp, width, stem)
        if bn_splits > 1:
            convert_split_bn(self.encoder_q, bn_splits)
            convert_split_bn(self.encoder_k, bn_splits)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, r), dim=0))  # C x r
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (parameters only, as official)."""
        params_q = [p.data for p in self.encoder_q.parameters()]
        params_k = [p.data for p in self.encoder_k.parameters()]
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> torch.Tensor:
        """Write the keys of all ranks (B_global x C) at the pointer; wraps around the ring of size r. Returns the
        gathered keys (rank order), which ``--estep-features bank`` keeps too."""
        keys = dist_utils.all_gather_cat(keys)  # B_global x C
        b = keys.shape[0]
        if self.r % b:
            raise PCLError(f"queue size --pcl-r {self.r} must be a multiple of the global batch {b}")
        # The pointer stays on the device: reading it (``int(self.queue_ptr)``, then slicing) would be a
        # device-to-host sync every step that stalls the CPU until the GPU has finished the step so far. The
        # columns ptr .. ptr + b - 1 (mod r) are computed and written on the device instead.
        cols = (self.queue_ptr + torch.arange(b, device=self.queue_ptr.device)) % self.r  # B_global
        self.queue.index_copy_(1, cols, keys.t().to(self.queue.dtype))  # queue: C x r
        self.queue_ptr.add_(b).remainder_(self.r)
        return keys

    @torch.no_grad()
    def _shuffled_keys(self, im_k: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Key features computed on a shuffled batch (across ranks with DDP), returned in input order."""
        if dist_utils.is_dist():
            x_all = dist_utils.all_gather_cat(im_k)
            perm = torch.randperm(x_all.shape[0], device=im_k.device, generator=generator)
            dist_utils.broadcast_(perm, 0)  # every rank uses rank 0's permutation
            mine = perm.view(dist_utils.world_size(), -1)[dist_utils.rank()]
            k = F.normalize(self.encoder_k(x_all[mine]), dim=1)
            k_all = dist_utils.all_gather_cat(k)
            return k_all[torch.argsort(perm).view(dist_utils.world_size(), -1)[dist_utils.rank()]]
        perm = torch.randperm(im_k.shape[0], device=im_k.device, generator=generator)
        k = F.normalize(self.encoder_k(im_k[perm]), dim=1)
        return k[torch.argsort(perm)]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.momentum_update()
            k = self._shuffled_keys(im_k, generator)  # keys: B x C, no gradient
        q = F.normalize(self.encoder_q(im_q), dim=1)  # queries: B x C
        return q, k

    @torch.no_grad()
    def encode_key(self, images: torch.Tensor) -> torch.Tensor:
        """Momentum-encoder features for the E-step (call in eval mode): B x C, L2-normalised."""
        return F.normalize(self.encoder_k(images), dim=1)


DIVERGED = 1e10  # no parameter of a healthy ResNet/MLP comes near this; a diverged one passes it while finite


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any ``.module`` wrapper); the model itself otherwise."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def check_weights(model: nn.Module, where: str, source: str | None = None) -> None:
    """Refuse diverged weights: non-finite, or finite but beyond DIVERGED (an update after the last loss check can
    take them to 1e28 while every loss seen was finite). One host sync. ``source``: the checkpoint they were just
    loaded from (then the error names that file, not the lr)."""
    largest = torch.stack([p.detach().abs().max().float() for p in model.parameters()]).max().item()
    if source is not None and (not math.isfinite(largest) or largest >= DIVERGED):
        raise PCLError(f"--resume {source} holds diverged weights (largest |w| = {largest:.3g}): the run that wrote "
                       f"it diverged; resume an earlier checkpoint of it (and lower --lr from there)")
    if not math.isfinite(largest) or largest >= DIVERGED:
        raise PCLError(f"the weights diverged by {where} (largest |w| = {largest:.3g}): nothing was saved; lower "
                       f"--lr and resume from the last checkpoint")


def channels_last(requested: bool, device: torch.device) -> bool:
    """--channels-last takes effect on GPUs only (see :func:`apply_speed_options`)."""
    return requested and device.type != "cpu"


def onednn_block(capability: str | None = None) -> int:
    """oneDNN's register block of input channels on this CPU (``capability``: torch's name of its vector ISA): 8
    with AVX2, 16 with AVX-512 or anything unknown (uxlfoundation/oneDNN#6035)."""
    capability = capability if capability is not None else torch.backends.cpu.get_cpu_capability()
    return 8 if capability.upper() == "AVX2" else 16


def cpu_compile_problem(arch: str, width: int, stem: str, device: torch.device,
                        capability: str | None = None) -> str | None:
    """Why --compile must not run here (None: it may): on the CPU, Inductor lays convolutions out channels-last by
    itself, and oneDNN's NHWC 1x1 stride-2 backward crashes the process (a segmentation fault, no message) when the
    conv has fewer input channels than its register block (:func:`onednn_block`) -- the downsampling convs of
    narrow ResNets (--width 4 on AVX2, 3 of 3 runs; --width 8 trained there)."""
    if device.type != "cpu":
        return None
    block = onednn_block(capability)
    narrow = min((m.in_channels for m in build_backbone(arch, width, stem).modules()
                  if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (2, 2)), default=None)
    if narrow is None or narrow >= block:
        return None
    safe = math.ceil(block * width / narrow)
    return (f"--compile on the CPU with -a {arch} --width {width}: its narrowest 1x1 stride-2 convolution has {narrow} "
            f"input channels, and oneDNN's channels-last kernel (Inductor's choice on the CPU) crashes the process "
            f"below {block} on this CPU (oneDNN#6035); drop --compile, or use --width {safe} or more")


def apply_speed_options(model: MoCo, use_channels_last: bool, compile_encoders: bool) -> bool:
    """--channels-last and --compile on the encoders (numerics unchanged up to kernel choice); returns whether
    channels-last is in effect.

    --channels-last is ignored on the CPU (with a warning): it is slower there (ResNet-50: 2.0 vs 2.4 images/s
    on our 2-core test machine), and oneDNN's NHWC 1x1 stride-2 weight-gradient kernel hangs, crashes or
    computes wrong gradients when the conv has fewer input channels than its register block (8 on AVX2, 16 on
    AVX-512; uxlfoundation/oneDNN#6035) -- the downsampling convs of narrow ResNets. We saw it hang here.
    """
    device = next(model.parameters()).device
    if use_channels_last and not channels_last(use_channels_last, device):
        logger.warning("--channels-last is ignored on the CPU: slower there, and oneDNN's NHWC 1x1 stride-2 "
                       "weight-gradient kernel can hang or give wrong gradients on narrow convs "
                       "(uxlfoundation/oneDNN#6035); it is meant for GPUs")
    if channels_last(use_channels_last, device):
        model.to(memory_format=torch.channels_last)
    if compile_encoders:  # in place: parameter names (and checkpoints) stay the official ones
        model.encoder_q.compile()
        model.encoder_k.compile()
    return channels_last(use_channels_last, device)
