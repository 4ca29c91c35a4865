import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import HostSyncRecorder
from pcl import PCLError
from pcl.model import MoCo, SplitBatchNorm, build_backbone, build_encoder


def _tiny(**kw):
    opts = dict(arch="resnet18", dim=8, r=16, m=0.9, mlp=False, width=4, stem="small", bn_splits=1)
    opts.update(kw)
    torch.manual_seed(0)
    return MoCo(**opts)


def test_backbone_width_64_is_torchvision_resnet():
    ours = build_backbone("resnet18")
    ref = torchvision.models.resnet18()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for n, p in ref.named_parameters()
                                                            if not n.startswith("fc."))
    assert ours(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize("arch,width,feat", [("resnet18", 8, 64), ("resnet50", 8, 256)])
def test_backbone_width_and_small_stem(arch, width, feat):
    m = build_backbone(arch, width, "small")
    assert isinstance(m.maxpool, nn.Identity) and m.conv1.stride == (1, 1) and m.conv1.kernel_size == (3, 3)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, feat)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(PCLError, match="unknown architecture 'vgg16'"):
        build_backbone("vgg16")


def test_mlp_head_uses_official_key_layout():
    keys = build_encoder("resnet18", 128, mlp=True, width=8).state_dict().keys()
    assert {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"} <= set(keys)
    assert "fc.weight" in build_encoder("resnet18", 128, mlp=False, width=8).state_dict()


def test_momentum_update_formula_and_no_key_gradient():
    model = _tiny()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_q = [p.detach().clone() for p in model.encoder_q.parameters()]
    before_k = [p.detach().clone() for p in model.encoder_k.parameters()]
    x = torch.randn(4, 3, 16, 16)
    q, k = model(x, x)
    for pq, pk0, pk in zip(before_q, before_k, model.encoder_k.parameters()):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-6)
    (q * k).sum().backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert any(p.grad is not None for p in model.encoder_q.parameters())
    assert not k.requires_grad
    assert torch.allclose(q.norm(dim=1), torch.ones(4)) and torch.allclose(k.norm(dim=1), torch.ones(4))


def test_queue_wraps_around():
    model = _tiny(r=8)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8), atol=1e-5)
    for step in range(3):  # 3 x 4 keys into a ring of 8: positions 0-3, 4-7, 0-3
        keys = torch.full((4, 8), float(step + 1))
        model.dequeue_and_enqueue(keys)
    assert int(model.queue_ptr) == 4
    assert torch.all(model.queue[:, :4] == 3) and torch.all(model.queue[:, 4:] == 2)
    with pytest.raises(PCLError, match="multiple of the global batch"):
        model.dequeue_and_enqueue(torch.zeros(3, 8))


def test_split_batchnorm_normalises_each_interleaved_sub_batch():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    out = bn(x)
    ref = nn.BatchNorm2d(3)
    for s in range(2):  # sample n is in split n % 2
        sub = x[s::2]
        assert torch.allclose(out[s::2], ref(sub), atol=1e-5)
    ref_means = torch.stack([x[s::2].mean(dim=(0, 2, 3)) for s in range(2)]).mean(0)
    assert torch.allclose(bn.running_mean, 0.1 * ref_means, atol=1e-6)
    bn.eval()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    plain.eval()
    assert torch.allclose(bn(x), plain(x))


def test_single_device_shuffle_bn_keys_depend_on_the_sub_batch_they_land_in():
    model = _tiny(bn_splits=2, m=1.0)  # m = 1: key encoder frozen, so both calls see the same weights
    model.train()
    x = torch.randn(8, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    _, k1 = model(x, x, generator=gen)
    perm = torch.randperm(8)
    gen = torch.Generator().manual_seed(0)
    _, k2 = model(x, x[perm], generator=gen)
    # same shuffle applied to a permuted batch: different sub-batches, so outputs differ from k1[perm]
    assert k2.shape == k1.shape
    assert not torch.allclose(k2, k1[perm])


def _old_enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """The formula dequeue_and_enqueue had (and the official code has), on host ints: the reference."""
    queue[:, ptr:ptr + keys.shape[0]] = keys.t()
    return (ptr + keys.shape[0]) % queue.shape[1]


def test_enqueue_matches_the_slice_formula_over_a_wrap_around():
    model = _tiny(r=12)
    queue, ptr = model.queue.clone(), 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # 5 x 4 keys into a ring of 12: wraps after the third
        keys = torch.randn(4, 8, generator=gen)
        model.dequeue_and_enqueue(keys)
        ptr = _old_enqueue(queue, ptr, keys)
        assert torch.equal(model.queue, queue) and model.queue_ptr.tolist() == [ptr]
    assert model.queue.shape == (8, 12) and model.queue_ptr.shape == (1,) and model.queue_ptr.dtype == torch.long


def test_enqueue_makes_no_host_sync():
    model = _tiny(r=8)
    with HostSyncRecorder() as probe:  # the recorder sees the old code's read of the pointer
        int(model.queue_ptr)
    assert probe.calls == ["__int__"]
    with HostSyncRecorder() as rec:
        for _ in range(3):
            model.dequeue_and_enqueue(torch.randn(4, 8))
    assert rec.calls == []


def _bn_pair(num_splits: int) -> tuple[SplitBatchNorm, SplitBatchNorm]:
    torch.manual_seed(0)
    bn = SplitBatchNorm(5, num_splits=num_splits)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    twin = SplitBatchNorm(5, num_splits=num_splits)
    twin.load_state_dict(bn.state_dict())
    return bn, twin


@pytest.mark.parametrize("num_splits,n", [(2, 8), (4, 8), (4, 4)])
def test_split_batchnorm_keeps_channels_last_and_matches_the_nchw_path(num_splits, n):
    bn, ref = _bn_pair(num_splits)
    x = (torch.randn(n, 5, 3, 4) * 2 + 0.5).requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(n, 5, 3, 4)
    for step in range(2):  # two steps: the running statistics compound
        out, out_cl = ref(x), bn(x_cl)
        assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
        assert torch.allclose(out_cl, out, atol=1e-5)
        (out * grad_out).sum().backward()
        (out_cl * grad_out).sum().backward()
    assert torch.allclose(x_cl.grad, x.grad, atol=1e-5)
    assert torch.allclose(bn.weight.grad, ref.weight.grad, atol=1e-5)
    assert torch.allclose(bn.bias.grad, ref.bias.grad, atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    bn.eval(), ref.eval()
    assert torch.allclose(bn(x_cl), ref(x), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_batchnorm_channels_last_statistics_are_float32_under_autocast(dtype):
    """--amp fp16 --channels-last: activations of std ~300 (variance 9e4 > float16's 65504) normalise as in
    float64, and the running variance stays finite (it became inf: the E-step's eval-mode BN then broke)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).to(memory_format=torch.channels_last)
    bn, ref = SplitBatchNorm(4, num_splits=2), SplitBatchNorm(4, num_splits=2).double()
    images = torch.randn(8, 3, 7, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.mul_(300 / conv.weight.flatten(1).norm(dim=1)[:, None, None, None])  # outputs of std ~300
    with torch.autocast("cpu", dtype=dtype):
        x = conv(images)
    assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last) and x.float().std() > 200
    x = x.detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, want = bn(x), ref(x64)
    assert out.dtype == dtype and torch.isfinite(bn.running_var).all() and torch.isfinite(out).all()
    assert torch.allclose(bn.running_var.double(), ref.running_var, rtol=1e-3)
    assert torch.allclose(bn.running_mean.double(), ref.running_mean, rtol=1e-3, atol=1e-2)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # the output's own rounding: normalised values of a few units
    assert (out.double() - want).abs().max() < tol
    grad_out = torch.randn(want.shape, dtype=torch.float64)
    (out.double() * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    assert x.grad.dtype == dtype and torch.allclose(x.grad.double(), x64.grad, rtol=0.02, atol=1e-5)
    assert torch.allclose(bn.weight.grad.double(), ref.weight.grad, rtol=1e-2, atol=1e-2)


def test_split_batchnorm_momentum_none_is_a_cumulative_average_in_both_layouts():
    torch.manual_seed(0)
    xs = [torch.randn(8, 3, 2, 2) * (i + 1) + i for i in range(3)]
    for fmt in (torch.contiguous_format, torch.channels_last):
        bn = SplitBatchNorm(3, num_splits=2, momentum=None)
        for x in xs:
            bn(x.to(memory_format=fmt))
        means = [torch.stack([x[s::2].mean(dim=(0, 2, 3)) for s in range(2)]).mean(0) for x in xs]
        assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
        assert int(bn.num_batches_tracked) == 3
