"""Loss math as pure functions: InfoNCE (MoCo), negative-prototype sampling, ProtoNCE (PCL, Eq. 11).

Shapes: B = batch, C = feature dim (``--low-dim``), r = queue size / negatives, k = prototypes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def info_nce_logits(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo logits ``[l_pos, l_neg] / T`` with the positive at column 0.

    q, k: B x C (L2-normalised); queue: C x r (the official buffer layout).
    Returns logits B x (1 + r) and labels (zeros, length B).
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # B x 1
    l_neg = q @ queue  # B x r
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


def sample_negative_prototypes(
    num_prototypes: int,
    positive_ids: torch.Tensor,
    r: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``min(r, available)`` distinct prototype ids, none of them in ``positive_ids``, uniformly.

    The official code samples from ``set(range(k)) - set(positives)`` with ``random.sample`` (a Python
    set of k ids per step, and a TypeError on Python >= 3.11). Here every prototype gets an iid uniform
    score, positives get -1, and the r largest scores are kept: a uniformly random r-subset of the
    non-positives, on the device of ``positive_ids``, with no host sync when k - B >= r.
    """
    device = positive_ids.device
    scores = torch.rand(num_prototypes, generator=generator, device=device)
    scores[positive_ids] = -1.0
    if num_prototypes - positive_ids.numel() >= r:
        count = r  # enough negatives whatever the duplicates among positives: no sync needed
    else:
        available = num_prototypes - int(torch.unique(positive_ids).numel())
        count = min(r, available)
    return torch.topk(scores, count, sorted=False).indices


def prototype_logits(
    q: torch.Tensor,
    centroids: torch.Tensor,
    concentration: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProtoNCE logits for one granularity, laid out as the official code: B positives, then R negatives.

    q: B x C; centroids: k x C (L2-normalised); concentration: k (phi); positive_ids: B; negative_ids: R.
    logits[i, j] = q_i . c_{ids[j]} / phi_{ids[j]} with ids = [positive_ids; negative_ids]: B x (B + R).
    Labels are arange(B): sample i's positive prototype is column i.
    """
    ids = torch.cat([positive_ids, negative_ids])  # B + R
    selected = centroids.index_select(0, ids)  # (B + R) x C   (gather rows, then one matmul)
    logits = (q @ selected.t()) / concentration.index_select(0, ids)
    labels = torch.arange(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


def proto_nce(
    q: torch.Tensor,
    index: torch.Tensor,
    im2cluster: Sequence[torch.Tensor],
    centroids: Sequence[torch.Tensor],
    concentration: Sequence[torch.Tensor],
    r: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Prototype term of ProtoNCE: mean over granularities of cross-entropy on :func:`prototype_logits`.

    q: B x C; index: B dataset indices of the batch. Returns (loss, logits per granularity, labels).
    """
    losses, all_logits, all_labels = [], [], []
    for assign, protos, phi in zip(im2cluster, centroids, concentration):
        pos = assign[index]
        neg = sample_negative_prototypes(protos.shape[0], pos, r, generator)
        logits, labels = prototype_logits(q, protos, phi, pos, neg)
        losses.append(F.cross_entropy(logits.float(), labels))
        all_logits.append(logits)
        all_labels.append(labels)
    return torch.stack(losses).mean(), all_logits, all_labels


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracy in percent, as the official ``accuracy`` (acc_inst / acc_proto)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # B x maxk
    correct = pred.eq(target[:, None])
    return [correct[:, :k].any(dim=1).float().mean().item() * 100.0 for k in topk]
