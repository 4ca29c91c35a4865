import math

import pytest
import torch
import torch.nn.functional as F

from pcl.loss import accuracy, info_nce_logits, proto_nce, prototype_logits, sample_negative_prototypes


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_info_nce_logits_match_float64_reference():
    q, k = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    queue = _unit(16, 8, seed=3).t()  # C x r
    logits, labels = info_nce_logits(q.float(), k.float(), queue.float().contiguous(), 0.2)
    ref = torch.zeros(4, 17, dtype=torch.float64)
    for i in range(4):
        ref[i, 0] = (q[i] * k[i]).sum() / 0.2
        for j in range(16):
            ref[i, 1 + j] = (q[i] * queue[:, j]).sum() / 0.2
    assert logits.shape == (4, 17)
    assert torch.allclose(logits.double(), ref, atol=1e-5)
    assert labels.tolist() == [0] * 4


@pytest.mark.parametrize("k,b,r", [(100, 8, 30), (1000, 64, 500), (50, 32, 1000)])
def test_negative_sampling_invariants(k, b, r):
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, k, (b,), generator=gen)
    neg = sample_negative_prototypes(k, pos, r, gen)
    available = k - len(set(pos.tolist()))
    assert neg.numel() == min(r, available)
    assert len(set(neg.tolist())) == neg.numel()  # distinct
    assert not set(neg.tolist()) & set(pos.tolist())  # never a positive
    assert neg.dtype == torch.long and neg.device == pos.device
    assert int(neg.min()) >= 0 and int(neg.max()) < k


def test_negative_sampling_with_few_prototypes_uses_all_of_them():
    pos = torch.tensor([0, 0, 3])
    neg = sample_negative_prototypes(6, pos, 16384)
    assert sorted(neg.tolist()) == [1, 2, 4, 5]


def test_negative_sampling_is_uniform_and_seeded():
    k, r, draws = 40, 10, 4000
    pos = torch.tensor([0, 1, 2, 3])
    gen = torch.Generator().manual_seed(123)
    counts = torch.zeros(k)
    for _ in range(draws):
        counts[sample_negative_prototypes(k, pos, r, gen)] += 1
    assert counts[:4].sum() == 0
    expected = draws * r / (k - 4)  # ~1111 per non-positive prototype
    # binomial std ~ sqrt(n p (1-p)) ~ 31; 5 sigma
    assert (counts[4:] - expected).abs().max() < 5 * math.sqrt(expected * (1 - r / (k - 4)))
    a = sample_negative_prototypes(k, pos, r, torch.Generator().manual_seed(7))
    b = sample_negative_prototypes(k, pos, r, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_prototype_logits_match_float64_reference_and_official_layout():
    q = _unit(3, 5, seed=4)
    c = _unit(7, 5, seed=5)
    phi = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.1
    pos, neg = torch.tensor([2, 2, 6]), torch.tensor([0, 4, 5])
    logits, labels = prototype_logits(q.float(), c.float(), phi.float(), pos, neg)
    ids = [2, 2, 6, 0, 4, 5]
    ref = torch.tensor([[float((q[i] * c[j]).sum() / phi[j]) for j in ids] for i in range(3)], dtype=torch.float64)
    assert logits.shape == (3, 6)
    assert torch.allclose(logits.double(), ref, atol=1e-5)
    assert labels.tolist() == [0, 1, 2]


def test_proto_nce_is_mean_of_granularity_cross_entropies():
    q = _unit(4, 6, seed=8).float()
    index = torch.tensor([0, 3, 5, 7])
    im2cluster = [torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])]
    centroids = [_unit(3, 6, seed=9).float(), _unit(6, 6, seed=10).float()]
    phi = [torch.full((3,), 0.2), torch.linspace(0.1, 0.3, 6)]
    loss, logits, labels, _ = proto_nce(q, index, im2cluster, centroids, phi, r=100,
                                     generator=torch.Generator().manual_seed(0))
    ref = []
    gen = torch.Generator().manual_seed(0)
    for a, c, p in zip(im2cluster, centroids, phi):
        pos = a[index]
        neg = sample_negative_prototypes(c.shape[0], pos, 100, gen)
        lg = torch.stack([torch.tensor([float(q[i] @ c[j] / p[j]) for j in torch.cat([pos, neg])])
                          for i in range(4)]).double()
        ref.append(F.cross_entropy(lg, torch.arange(4)))
    assert loss.item() == pytest.approx(float(sum(ref) / 2), abs=1e-5)
    assert [lg.shape[0] for lg in logits] == [4, 4]


def test_accuracy_topk():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    tgt = torch.tensor([1, 1, 0])
    top1, top2 = accuracy(out, tgt, (1, 2))
    assert top1 == pytest.approx(100 / 3)
    assert top2 == pytest.approx(200 / 3)


def test_unique_prototypes_drop_copies_of_the_positive_from_the_denominator():
    from pcl.loss import mask_duplicate_positives

    q, c = _unit(6, 8, seed=4), _unit(5, 8, seed=5)
    phi = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    pos = torch.tensor([0, 1, 0, 2, 1, 0])  # samples 0, 2, 5 share prototype 0; 1 and 4 share prototype 1
    neg = torch.tensor([3, 4])
    logits, labels = prototype_logits(q, c, phi, pos, neg)
    masked = mask_duplicate_positives(logits.clone(), pos)
    loss = F.cross_entropy(masked, labels)
    ids = torch.cat([pos, neg])
    ref = 0.0
    for i in range(6):  # float64 reference: the denominator holds each prototype once
        keep = [j for j in range(8) if j == i or j >= 6 or ids[j] != pos[i]]
        s = torch.stack([(q[i] @ c[ids[j]]) / phi[ids[j]] for j in keep])
        ref += -(q[i] @ c[pos[i]]) / phi[pos[i]] + torch.logsumexp(s, 0)
    assert loss.item() == pytest.approx(ref.item() / 6, abs=1e-10)
    assert torch.isinf(masked[0, 2]) and torch.isinf(masked[2, 5]) and not torch.isinf(masked[0, 0])
    assert torch.equal(masked[3], logits[3])  # a row with no batch-mate in its cluster is unchanged
    # with no shared prototypes the option changes nothing (the official numerics)
    distinct = torch.arange(5)
    lg, _ = prototype_logits(q[:5], c, phi, distinct, neg[:0])
    assert torch.equal(mask_duplicate_positives(lg.clone(), distinct), lg)


def test_proto_nce_chunks_equal_the_mean_of_per_device_losses_float64():
    """--proto-chunks N on one device = DDP over N devices: each block of B/N rows has its own positives and its
    own negative draw, and the loss is the mean of the blocks' cross-entropies (gradients too)."""
    q = _unit(8, 6, seed=11).requires_grad_()
    index = torch.arange(8)
    # k = 5 with r = 100: blocks whose positives cover fewer prototypes get more negatives (padding with -inf)
    im2cluster = [torch.tensor([0, 0, 0, 0, 1, 2, 3, 4]), torch.arange(8) % 7]
    centroids = [_unit(5, 6, seed=12), _unit(7, 6, seed=13)]
    phi = [torch.linspace(0.1, 0.5, 5, dtype=torch.float64), torch.linspace(0.2, 0.3, 7, dtype=torch.float64)]
    loss, logits, labels, _ = proto_nce(q, index, im2cluster, centroids, phi, r=100,
                                     generator=torch.Generator().manual_seed(3), chunks=2)
    (grad,) = torch.autograd.grad(loss, q)
    gen = torch.Generator().manual_seed(3)
    ref = []
    for a, c, p in zip(im2cluster, centroids, phi):
        per_device = []
        for rows in (slice(0, 4), slice(4, 8)):
            pos = a[index[rows]]
            neg = sample_negative_prototypes(c.shape[0], pos, 100, gen)
            ids = torch.cat([pos, neg])
            lg = torch.stack([torch.stack([q[i] @ c[j] / p[j] for j in ids]) for i in range(rows.start, rows.stop)])
            per_device.append(F.cross_entropy(lg, torch.arange(4)))
        ref.append(torch.stack(per_device).mean())
    ref_loss = torch.stack(ref).mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, q)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)  # the loss is taken in fp32
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert logits[0].shape == (8, 4 + 4)  # first block: 1 distinct positive -> 4 negatives; second: 4 -> 1, padded
    assert torch.isinf(logits[0][4:, 4 + 1:]).all() and labels[0].tolist() == [0, 1, 2, 3] * 2


def test_proto_nce_one_chunk_is_the_whole_batch_and_bad_chunks_are_refused():
    q = _unit(4, 6, seed=8)
    index = torch.tensor([0, 3, 5, 7])
    im2cluster = [torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])]
    centroids, phi = [_unit(3, 6, seed=9)], [torch.full((3,), 0.2, dtype=torch.float64)]
    a = proto_nce(q, index, im2cluster, centroids, phi, r=10, generator=torch.Generator().manual_seed(0))[0]
    b = proto_nce(q, index, im2cluster, centroids, phi, r=10, generator=torch.Generator().manual_seed(0), chunks=1)[0]
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="not divisible into 3"):
        proto_nce(q, index, im2cluster, centroids, phi, r=10, chunks=3)
