"""Loss math as pure functions: InfoNCE (MoCo), negative-prototype sampling, ProtoNCE (PCL, Eq. 11).

Shapes: B = batch, C = feature dim (``--low-dim``), r = queue size / negatives, k = prototypes.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

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
    # in place: mm's backward keeps q and selected, not its output, so this is autograd-safe and saves one
    # B x (B + R) allocation (the out-of-place division doubled the forward time at B = 256 on CPU)
    logits = (q @ selected.t()).div_(concentration.index_select(0, ids))
    labels = torch.arange(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


def mask_duplicate_positives(logits: torch.Tensor, positive_ids: torch.Tensor) -> torch.Tensor:
    """Drop the copies of each row's own prototype from its denominator (not in the official code).

    In the official layout column j < B holds sample j's positive prototype, so when samples i and j share a
    cluster, row i's softmax contains its positive prototype twice: once as the target, once as a
    "negative". With B = 256 per device and k ~ B, most rows have such copies. logits: B x (B + R),
    positive_ids: B. Sets logits[i, j] = -inf where j != i, j < B and positive_ids[j] == positive_ids[i]
    (in place; returns logits).
    """
    same = positive_ids[:, None] == positive_ids[None, :]  # B x B
    same.fill_diagonal_(False)
    logits[:, : positive_ids.shape[0]].masked_fill_(same, float("-inf"))
    return logits


def _chunk_logits(
    q: torch.Tensor,
    pos: torch.Tensor,
    protos: torch.Tensor,
    phi: torch.Tensor,
    r: int,
    generator: torch.Generator | None,
    chunks: int,
    unique_prototypes: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One granularity's logits, each of ``chunks`` contiguous row blocks with its own positives and negative draw.

    q: B x C, pos: B. A chunk of b = B / chunks rows is what one of the paper's GPUs saw: its b positives and
    its own r negatives. Chunks are stacked row-wise, padded with -inf columns to the widest (a granularity
    with k - b < r can supply a different number of negatives per chunk): logits B x (b + R_max), labels
    arange(b) per chunk, ids (b + R_max) per chunk (padding ids repeat the last real one; their logits are -inf).
    """
    rows, labels, ids = [], [], []
    for q_c, pos_c in zip(q.chunk(chunks), pos.chunk(chunks)):
        neg = sample_negative_prototypes(protos.shape[0], pos_c, r, generator)
        logits, lab = prototype_logits(q_c, protos, phi, pos_c, neg)
        if unique_prototypes:
            logits = mask_duplicate_positives(logits, pos_c)
        rows.append(logits)
        labels.append(lab)
        ids.append(torch.cat([pos_c, neg]))
    if chunks == 1:
        return rows[0], labels[0], ids[0]
    width = max(x.shape[1] for x in rows)
    rows = [F.pad(x, (0, width - x.shape[1]), value=float("-inf")) for x in rows]
    ids = [torch.cat([i, i[-1:].expand(width - i.numel())]) for i in ids]
    return torch.cat(rows), torch.cat(labels), torch.stack(ids)


class ProtoNCE(NamedTuple):
    """:func:`proto_nce`'s result: the term, and per granularity its logits, labels and the logits' columns'
    prototype ids (what the PAUC terms and the accuracy meters read)."""
    loss: torch.Tensor  # 0-dim
    logits: list[torch.Tensor]  # per granularity: B x (B + r) (chunked: B x (B/chunks + r))
    labels: list[torch.Tensor]  # per granularity: B
    ids: list[torch.Tensor]  # per granularity: the columns' prototype ids (chunks x columns with chunks > 1)


def proto_nce(
    q: torch.Tensor,
    index: torch.Tensor,
    im2cluster: Sequence[torch.Tensor],
    centroids: Sequence[torch.Tensor],
    concentration: Sequence[torch.Tensor],
    r: int,
    generator: torch.Generator | None = None,
    unique_prototypes: bool = False,
    chunks: int = 1,
) -> ProtoNCE:
    """Prototype term of ProtoNCE: mean over granularities of cross-entropy on :func:`prototype_logits`.

    q: B x C; index: B dataset indices of the batch. ``unique_prototypes`` applies
    :func:`mask_duplicate_positives` (off: the official numerics). ``chunks`` > 1 computes the term per
    contiguous block of B / chunks rows, each with its own positives and negative draw, and averages the rows:
    what DistributedDataParallel over ``chunks`` devices computes (the paper's 4 V100s: 4 x 64), on one device.
    """
    if q.shape[0] % chunks:
        raise ValueError(f"batch of {q.shape[0]} rows is not divisible into {chunks} ProtoNCE chunks")
    losses, all_logits, all_labels, all_ids = [], [], [], []
    for assign, protos, phi in zip(im2cluster, centroids, concentration):
        logits, labels, ids = _chunk_logits(q, assign[index], protos, phi, r, generator, chunks, unique_prototypes)
        losses.append(F.cross_entropy(logits.float(), labels))
        all_logits.append(logits)
        all_labels.append(labels)
        all_ids.append(ids)
    return ProtoNCE(torch.stack(losses).mean(), all_logits, all_labels, all_ids)


# ----------------------------------------------------------------------------------------------------
# PAUC (Mo, Sun, Li, BMVC 2022): alignment, uniformity, correlation on top of ProtoNCE.
# A reconstruction from the paper's description (no official code is public), built from the standard
# definitions; "prototype-level feature" is defined in prototype_features.
# ----------------------------------------------------------------------------------------------------
def prototype_alignment(q: torch.Tensor, positive_centroids: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola's alignment towards the positive prototype: L_align = E_i ||v_i - c_{pos(i)}||_2^alpha.

    q: B x C (unit rows), positive_centroids: B x C (unit rows, c_{pos(i)} for each i). Zero when every
    embedding sits on its prototype.
    """
    return (q - positive_centroids).norm(dim=1).pow(alpha).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's uniformity: L_unif = log E_{i<j} exp(-t ||z_i - z_j||_2^2) over the batch's pairs.

    z: B x C (unit rows), B >= 2. At most 0, reached when all z are equal (collapse); lower is more uniform.
    """
    sq = torch.pdist(z, p=2).pow(2)  # B(B-1)/2 pairwise squared distances
    count = torch.full((), float(sq.numel()), dtype=z.dtype, device=z.device)  # a fill kernel: no host-to-device copy
    return torch.logsumexp(-t * sq, dim=0) - torch.log(count)


def prototype_features(logits: torch.Tensor, selected_centroids: torch.Tensor) -> torch.Tensor:
    """Prototype-level feature of each sample: the mixture of prototypes its ProtoNCE distribution assigns it,
    z_i = normalize(sum_j softmax(logits_i)_j c_j), with the logits' columns' prototypes c_j.

    logits: B x M (one granularity's ProtoNCE logits, phi included), selected_centroids: M x C -> B x C.
    It lives in the embedding space (C dims, so the correlation below is C x C, not k x k) and is
    differentiable through the assignment probabilities, which is where "coagulation" around one prototype
    shows: a sample whose distribution collapses onto its prototype has z_i = c_{pos(i)}.
    """
    return F.normalize(torch.softmax(logits.float(), dim=1) @ selected_centroids.float(), dim=1)


def correlation_loss(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Barlow-Twins-style decorrelation: with each dimension standardised over the batch,
    C = z1n^T z2n / B (C x C cross-correlation of the two views) and L_corr = sum_{a != b} C_ab^2 / C.

    z1, z2: B x C. Zero when the dimensions are decorrelated across the views (the diagonal is not penalised).
    """
    b, d = z1.shape
    z1n = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    z2n = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    c = z1n.t() @ z2n / b  # C x C
    off = c - torch.diag_embed(torch.diagonal(c))
    return off.pow(2).sum() / d


def pauc_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    index: torch.Tensor,
    im2cluster: Sequence[torch.Tensor],
    centroids: Sequence[torch.Tensor],
    concentration: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    ids: Sequence[torch.Tensor],
    alpha: float = 2.0,
    t: float = 2.0,
) -> dict[str, torch.Tensor]:
    """The three PAUC terms, each averaged over granularities.

    q: B x C queries (with gradient), k: B x C keys (no gradient), ``logits``/``ids``: the ProtoNCE logits of
    q and their columns' prototype ids per granularity (:class:`ProtoNCE`'s ``logits`` and ``ids``). The key's
    prototype-level feature uses the same columns: softmax(k c_j / phi_j).
    """
    align, unif, corr = [], [], []
    for assign, protos, phi, lg, col in zip(im2cluster, centroids, concentration, logits, ids):
        align.append(prototype_alignment(q, protos[assign[index]], alpha))
        selected = protos.index_select(0, col)  # M x C
        z_q = prototype_features(lg, selected)
        with torch.no_grad():
            z_k = prototype_features((k @ selected.t()) / phi.index_select(0, col), selected)
        unif.append(uniformity(z_q, t))
        corr.append(correlation_loss(z_q, z_k))
    return {"align": torch.stack(align).mean(), "uniform": torch.stack(unif).mean(), "corr": torch.stack(corr).mean()}


@torch.no_grad()
def top1_percent(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent as a 0-dim tensor on the device (no host sync): :func:`accuracy`'s number."""
    return output.topk(1, dim=1).indices[:, 0].eq(target).float().mean().double() * 100.0


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracy in percent, as the official ``accuracy`` (acc_inst / acc_proto)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # B x maxk
    correct = pred.eq(target[:, None])
    return [correct[:, :k].any(dim=1).float().mean().item() * 100.0 for k in topk]


class Prototypes(Protocol):
    """What the loss reads of an E-step result (:class:`pcl.cluster.ClusterResult`), one entry per granularity."""
    im2cluster: list[torch.Tensor]  # N
    centroids: list[torch.Tensor]  # k x C
    concentration: list[torch.Tensor]  # k: phi


class LossOutput(NamedTuple):
    total: torch.Tensor  # 0-dim: what is backpropagated
    inst: torch.Tensor  # 0-dim: InfoNCE
    proto: torch.Tensor | None  # 0-dim: the prototype term (None before the first E-step)
    logs: list[tuple[str, torch.Tensor]]  # (meter, 0-dim value) in log order; a name may repeat (averaged)


class PCLLoss:
    """The pretraining loss of one batch and everything it logs, the terms in one place:

        total = InfoNCE(q, k, queue) + ProtoNCE(q, prototypes) [+ w_align L_align + w_uniform L_uniform + w_corr L_corr]

    ProtoNCE is the mean over granularities of the prototype cross-entropy with phi as temperatures (added once
    there are prototypes, i.e. after --warmup-epoch); the PAUC terms are the optional weighted extras. To add a
    term: compute it in :meth:`__call__`, add it to ``total`` and append its meter to ``logs``. Every value stays
    on the device (no host sync). The terms are added in this order, as the official code adds them."""

    def __init__(self, temperature: float, num_cluster: Sequence[int], r: int, unique_prototypes: bool = False,
                 chunks: int = 1, pauc_weights: dict[str, float] | None = None, pauc_alpha: float = 2.0,
                 pauc_t: float = 2.0, proto_weight: float = 1.0) -> None:
        """``pauc_weights``: {"align", "uniform", "corr"} -> weight; None: no PAUC terms computed (a weight of 0
        computes and logs the term without adding it). ``proto_weight``: the ProtoNCE term's weight (1, as
        official; an ablation otherwise)."""
        self.temperature, self.num_cluster, self.r = temperature, tuple(num_cluster), r
        self.unique_prototypes, self.chunks = unique_prototypes, chunks
        self.pauc_weights, self.pauc_alpha, self.pauc_t = pauc_weights, pauc_alpha, pauc_t
        self.proto_weight = proto_weight

    def __call__(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, index: torch.Tensor,
                 prototypes: Prototypes | None, generator: torch.Generator | None = None) -> LossOutput:
        """q, k: B x C (unit rows, fp32); queue: C x r; index: B dataset indices; ``generator`` draws the
        negative prototypes."""
        logits, labels = info_nce_logits(q, k, queue, self.temperature)
        inst = F.cross_entropy(logits, labels)
        total, logs = inst, []
        proto = None
        if prototypes is not None:
            out = proto_nce(q, index, prototypes.im2cluster, prototypes.centroids, prototypes.concentration, self.r,
                            generator, unique_prototypes=self.unique_prototypes, chunks=self.chunks)
            proto = out.loss
            total = total + (proto if self.proto_weight == 1 else self.proto_weight * proto)  # 1: official bits
            logs.append(("loss_proto", proto))
            if self.pauc_weights is not None:
                terms = pauc_terms(q, k.detach(), index, prototypes.im2cluster, prototypes.centroids,
                                   prototypes.concentration, out.logits, out.ids, self.pauc_alpha, self.pauc_t)
                for name in ("align", "uniform", "corr"):
                    if self.pauc_weights[name]:
                        total = total + self.pauc_weights[name] * terms[name]
                    logs.append((f"loss_{name}", terms[name]))
            for k_, out_k, labels_k in zip(self.num_cluster, out.logits, out.labels):
                acc = top1_percent(out_k, labels_k)
                logs += [("acc_proto", acc), (f"acc_proto_k{k_}", acc)]  # acc_proto: over granularities, as official
        logs = [("loss", total), ("loss_inst", inst), *logs[:1], ("acc_inst", top1_percent(logits, labels)), *logs[1:]]
        return LossOutput(total, inst, proto, logs)

    @property
    def meters(self) -> tuple[str, ...]:
        """The meters that lead the logs, in order (whether or not a term is computed yet)."""
        return ("loss", "loss_inst", "loss_proto", "acc_inst", "acc_proto")
