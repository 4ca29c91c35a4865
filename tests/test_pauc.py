"""PAUC terms (a reconstruction of Mo et al. 2022): float64 references, gradients, constructed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from pcl.loss import (correlation_loss, pauc_terms, proto_nce, prototype_alignment, prototype_features,
                      uniformity)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_alignment_matches_reference_and_is_zero_on_the_prototype():
    q, c = unit(6, 8, seed=1), unit(6, 8, seed=2)
    ref = sum(float(((q[i] - c[i]) ** 2).sum()) for i in range(6)) / 6
    assert prototype_alignment(q, c).item() == pytest.approx(ref, rel=1e-12)
    assert prototype_alignment(q, c, alpha=1.0).item() == pytest.approx(
        sum(float((q[i] - c[i]).norm()) for i in range(6)) / 6, rel=1e-12)
    assert prototype_alignment(q, q.clone()).item() == 0.0


def test_uniformity_matches_reference_and_collapse_is_worst():
    z = unit(7, 5, seed=3)
    pairs = [math.exp(-2 * float(((z[i] - z[j]) ** 2).sum())) for i in range(7) for j in range(i + 1, 7)]
    assert uniformity(z).item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-12)
    collapsed = unit(1, 5, seed=4).repeat(7, 1)
    assert uniformity(collapsed).item() == pytest.approx(0.0, abs=1e-12)  # the maximum: log E exp(0)
    assert uniformity(z).item() < uniformity(collapsed).item()


def test_correlation_matches_reference_and_is_zero_when_decorrelated():
    z1, z2 = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    std = lambda x: (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)  # noqa: E731
    c = std(z1).t() @ std(z2) / 16
    ref = sum(float(c[a, b] ** 2) for a in range(4) for b in range(4) if a != b) / 4
    assert correlation_loss(z1, z2).item() == pytest.approx(ref, rel=1e-10)
    cols = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64)  # orthogonal +-1 columns
    assert correlation_loss(cols, cols).item() == pytest.approx(0.0, abs=1e-12)
    assert correlation_loss(z1, z1).item() > 0.0


def test_prototype_features_reference():
    logits, protos = torch.randn(3, 5, dtype=torch.float64), unit(5, 4, seed=5)
    p = torch.softmax(logits, 1)
    ref = F.normalize(torch.stack([sum(p[i, j] * protos[j] for j in range(5)) for i in range(3)]), dim=1)
    assert torch.allclose(prototype_features(logits, protos).double(), ref, atol=1e-6)
    sharp = torch.full((2, 5), -1e4, dtype=torch.float64)
    sharp[0, 1], sharp[1, 3] = 0.0, 0.0  # a collapsed assignment gives the prototype itself
    assert torch.allclose(prototype_features(sharp, protos).double(), protos[[1, 3]], atol=1e-6)


def test_terms_have_correct_gradients():
    q = unit(5, 4, seed=6).requires_grad_()
    c = unit(5, 4, seed=7)
    assert torch.autograd.gradcheck(lambda x: prototype_alignment(x, c), (q,))
    assert torch.autograd.gradcheck(lambda x: uniformity(x), (q,))
    z2 = torch.randn(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: correlation_loss(x, z2), (torch.randn(6, 3, dtype=torch.float64, requires_grad=True),))


def test_pauc_terms_on_protonce_outputs_backpropagate_to_q():
    gen = torch.Generator().manual_seed(0)
    n, b, d = 50, 8, 16
    im2cluster = [torch.randint(10, (n,), generator=gen), torch.randint(20, (n,), generator=gen)]
    centroids = [F.normalize(torch.randn(10, d, generator=gen), dim=1), F.normalize(torch.randn(20, d, generator=gen), dim=1)]
    phi = [torch.full((10,), 0.2), torch.full((20,), 0.2)]
    q = F.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
    k = F.normalize(torch.randn(b, d, generator=gen), dim=1)
    index = torch.randint(n, (b,), generator=gen)
    out = proto_nce(q, index, im2cluster, centroids, phi, 4, gen)
    logits, ids = out.logits, out.ids
    terms = pauc_terms(q, k, index, im2cluster, centroids, phi, logits, ids)
    assert set(terms) == {"align", "uniform", "corr"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
