"""The GPU path: k-means, negative sampling, logits and a short pretraining run on the accelerator.

Marked ``cuda``: they run where CUDA is (scripts/gpu_check.sh), and on the CPU with PCL_TEST_DEVICE=cpu
(scripts/gpu_check.sh --smoke, which the suite runs), so the code they cover is exercised on every machine.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_args
from pcl.checkpoint import load_checkpoint
from pcl.cluster import resolve_backend, run_kmeans
from pcl.engine import fit
from pcl.loss import prototype_logits, proto_nce, sample_negative_prototypes

pytestmark = pytest.mark.cuda


def _blobs(n_per=60, k=6, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=gen), dim=1) * 3
    x = centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(k * n_per, d, generator=gen)
    return F.normalize(x, dim=1), torch.arange(k).repeat_interleave(n_per)


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_torch_kmeans_on_the_accelerator_equals_the_cpu(accel):
    x, truth = _blobs()
    on_dev = run_kmeans(x.to(accel), [6, 12], 0.2, backend="torch", nredo=10)
    on_cpu = run_kmeans(x, [6, 12], 0.2, backend="torch", nredo=10)
    assert on_dev.im2cluster[0].device.type == accel.type  # the result stays where the features are
    assert _same_partition(on_dev.im2cluster[0].cpu(), truth) and _same_partition(on_cpu.im2cluster[0], truth)
    obj = lambda res, g: float(((x - res.centroids[g].cpu()[res.im2cluster[g].cpu()]) ** 2).sum())  # noqa: E731
    assert obj(on_dev, 0) == pytest.approx(obj(on_cpu, 0), rel=1e-4)  # the same optimum on the easy level


def test_auto_backend_stays_on_the_accelerator(accel):
    backend, why = resolve_backend("auto", accel)
    if accel.type == "cuda":
        assert "cuda" in why  # faiss-GPU, or the torch k-means on the GPU: never the host
    assert backend in ("faiss", "torch")


def test_negative_sampling_and_logits_on_the_accelerator(accel):
    k, r, b, d = 100_000, 16_384, 32, 128
    gen = torch.Generator(device=accel).manual_seed(0)
    pos = torch.randint(k, (b,), device=accel)
    neg = sample_negative_prototypes(k, pos, r, gen)
    assert neg.device.type == accel.type and neg.numel() == r
    assert torch.unique(neg).numel() == r and not torch.isin(neg, pos).any()
    q = F.normalize(torch.randn(b, d, device=accel), dim=1)
    c = F.normalize(torch.randn(k, d, device=accel), dim=1)
    phi = 0.1 + 0.2 * torch.rand(k, device=accel)
    logits, labels = prototype_logits(q, c, phi, pos, neg)
    ids = torch.cat([pos, neg]).cpu()
    ref = (q.cpu().double() @ c.cpu().double()[ids].t()) / phi.cpu().double()[ids]
    assert logits.shape == (b, b + r) and labels.device.type == accel.type
    assert torch.allclose(logits.cpu().double(), ref, atol=1e-4, rtol=1e-4)


def test_proto_nce_chunks_on_the_accelerator_equal_the_cpu(accel):
    q = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    index = torch.arange(16)
    assign = [torch.arange(16) % 5, torch.arange(16) % 11]
    cents = [F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), dim=1) for n in (5, 11)]
    phi = [torch.full((5,), 0.2), torch.linspace(0.1, 0.3, 11)]
    # r >= k - positives: every non-positive prototype is a negative, so the draw's order does not matter
    cpu = proto_nce(q, index, assign, cents, phi, r=64, chunks=4)[0]
    mv = lambda ts: [t.to(accel) for t in ts]  # noqa: E731
    dev = proto_nce(q.to(accel), index.to(accel), mv(assign), mv(cents), mv(phi), r=64,
                    generator=torch.Generator(device=accel).manual_seed(0), chunks=4)[0]
    assert dev.item() == pytest.approx(cpu.item(), abs=1e-5)


@pytest.mark.parametrize("speed", [[], ["--amp", "bf16", "--channels-last"]], ids=["fp32", "bf16_channels_last"])
def test_two_epoch_pretraining_with_an_e_step_on_the_accelerator(accel, tmp_path, speed):
    extra = ["--cpu"] if accel.type == "cpu" else []
    stats = fit(tiny_args(tmp_path, "--epochs", "2", "--warmup-epoch", "1", "--kmeans-backend", "auto", *speed, *extra))
    assert stats["epoch"] == 1 and torch.isfinite(torch.tensor(stats["loss_proto"]))
    ckpt = load_checkpoint(os.path.join(tmp_path, "checkpoint_last.pth.tar"))
    assert len(ckpt["cluster_result"]["im2cluster"]) == 2
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())  # loadable anywhere
