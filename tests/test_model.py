import pytest
import torch
import torch.nn as nn
import torchvision

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
