"""Loss terms of the two compression stages, as pure functions of embeddings.

Every input is a batch of L2-normalised embeddings, so a dot product is a
cosine similarity s(a, b). ``temperature`` may be a float or a scalar tensor
(a learnable logit scale); logits are ``s / temperature``. The formulas follow
the reconstruction in docs/paper.md §3-4 ([REC]): the paper's own formulas
could not be read.

Teacher embeddings (and frozen embeddings passed as teacher) are detached
here, so a caller cannot leak gradients into a teacher by forgetting
``torch.no_grad()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Temperature = float | Tensor


def intra_modal_distill_loss(student: Tensor, teacher: Tensor, temperature: Temperature,
                             queue: Tensor | None = None) -> Tensor:
    """Stage-1 intra-modal contrastive KD: InfoNCE from student rows to teacher columns.

    L = -(1/N) sum_i log( exp(s(S_i, T_i)/tau) / (sum_j exp(s(S_i, T_j)/tau) + sum_q exp(s(S_i, Q_q)/tau)) )

    ``student`` and ``teacher`` are [N, D] embeddings of the same N inputs (images or
    captions) from the student and the teacher tower; the positive of row i is the
    teacher's embedding of input i, the negatives are the teacher's embeddings of
    the other inputs plus the optional ``queue`` [Q, D]. A MoCo-style queue is sound
    here because the teacher is frozen: its cached embeddings never go stale.
    One direction only, as in the [3P] re-implementation (docs/paper.md §3).

    Example: ``intra_modal_distill_loss(F.normalize(student(x)), F.normalize(teacher(x)), 0.07)``
    """
    keys = teacher.detach()
    if queue is not None:
        keys = torch.cat([keys, queue.detach().to(keys.dtype)])
    logits = student @ keys.T / temperature
    return F.cross_entropy(logits, _diagonal_targets(student))


def contrastive_losses(text: Tensor, image: Tensor, temperature: Temperature) -> tuple[Tensor, Tensor]:
    """Symmetric CLIP InfoNCE over a batch of N matched (caption, image) pairs.

    L_t2v = -(1/N) sum_i log( exp(s(t_i, v_i)/tau) / sum_j exp(s(t_i, v_j)/tau) )
    L_v2t = -(1/N) sum_i log( exp(s(v_i, t_i)/tau) / sum_j exp(s(v_i, t_j)/tau) )

    Gradients reach whichever side requires them (in stage 2 one side is frozen).
    A batch holding two captions of the same image makes one of them a false
    negative; the sampler, not this function, should avoid that.

    Example: ``l_t2v, l_v2t = contrastive_losses(text_emb, image_emb, 0.01)``
    """
    logits = text @ image.T / temperature
    targets = _diagonal_targets(text)
    return F.cross_entropy(logits, targets), F.cross_entropy(logits.T, targets)


def similarity_distill_loss(student_text: Tensor, student_image: Tensor, teacher_text: Tensor,
                            teacher_image: Tensor, temperature: Temperature) -> Tensor:
    """L_KD: match the student's in-batch similarity distributions to the teacher pair's.

    p^T_i = softmax_j( s(T^t_i, T^v_j)/tau ),  p^S_i = softmax_j( s(S^t_i, S^v_j)/tau )   (rows: t->v)
    L_KD = 1/2 * [ (1/N) sum_i KL(p^T_i || p^S_i)  +  same over columns (v->t) ]

    The target comes from the *teacher* pair (f_t^T, f_v^T), detached. The [3P]
    re-implementation used the student's own similarities as the target, which
    makes the loss identically zero (docs/paper.md §4).

    Example: ``similarity_distill_loss(t_s, v_s, t_t, v_t, 0.01)`` in stage 2a, where t_s is t_t.
    """
    student_logits = student_text @ student_image.T / temperature
    with torch.no_grad():
        teacher_logits = teacher_text.detach() @ teacher_image.detach().T / temperature
    t2v = _kl_rows(teacher_logits, student_logits)
    v2t = _kl_rows(teacher_logits.T, student_logits.T)
    return (t2v + v2t) / 2


def hard_negative_loss(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: Temperature,
                       mask: Tensor | None = None) -> Tensor:
    """L_HN: InfoNCE of each anchor against its positive and its own K mined hard negatives.

    L_HN = -(1/N) sum_i log( exp(s(a_i,p_i)/tau) / (exp(s(a_i,p_i)/tau) + sum_k m_ik exp(s(a_i,n_ik)/tau)) )

    ``anchor`` and ``positive`` are [N, D]; ``negatives`` is [N, K, D]; ``mask`` [N, K]
    (bool, True = real negative) drops padding, e.g. where mining returned -1.
    A row whose negatives are all masked contributes log(1) = 0. In-batch
    negatives are deliberately absent: L_t2v/L_v2t already cover them.

    Example: ``hard_negative_loss(text_emb, image_emb, image_bank[hn_ids], 0.01, hn_ids >= 0)``
    """
    positive_logits = (anchor * positive).sum(-1, keepdim=True) / temperature
    negative_logits = torch.einsum("nd,nkd->nk", anchor, negatives) / temperature
    if mask is not None:
        negative_logits = negative_logits.masked_fill(~mask.bool(), float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the stage-2 terms; the paper's Figure 1 caption says a plain sum (all 1)."""

    t2v: float = 1.0
    v2t: float = 1.0
    kd: float = 1.0
    hn: float = 1.0

    def __post_init__(self) -> None:
        if min(self.t2v, self.v2t, self.kd, self.hn) < 0:
            raise ValueError(f"loss weights must be >= 0, got {self}")
        if max(self.t2v, self.v2t, self.kd, self.hn) == 0:
            raise ValueError("at least one loss weight must be > 0")


def stage2_loss(text: Tensor, image: Tensor, temperature: Temperature, weights: LossWeights = LossWeights(),
                *, teacher_text: Tensor | None = None, teacher_image: Tensor | None = None,
                kd_temperature: Temperature | None = None, hard_negatives: Tensor | None = None,
                hard_negative_mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """L = w_t2v L_t2v + w_v2t L_v2t + w_kd L_KD + w_hn L_HN for one stage-2 batch.

    ``text``/``image`` [N, D] are the pair being trained (one side frozen: teacher text
    in step 2a, the step-2a student image tower in step 2b). L_KD needs the teacher
    pair and uses ``kd_temperature`` (default: ``temperature``). L_HN anchors on the
    caption: ``hard_negatives`` [N, K, D] are image embeddings mined for each caption,
    ``hard_negative_mask`` [N, K] marks the real ones. A term with weight 0 is not
    computed, so its inputs may be None. L_t2v and L_v2t share one logits matrix, so
    both are reported when either weight is on (only weighted ones enter the total).

    Returns the weighted total and the *unweighted* value of each computed term
    (plus "total"), as floats for logging.

    Example: ``loss, parts = stage2_loss(t, v, 0.01, teacher_text=t, teacher_image=tv, hard_negatives=neg)``
    """
    terms: dict[str, Tensor] = {}
    if weights.t2v or weights.v2t:
        # One logits matrix serves both directions; skipping only one of them saves nothing.
        l_t2v, l_v2t = contrastive_losses(text, image, temperature)
        terms.update(t2v=l_t2v, v2t=l_v2t)
    if weights.kd:
        if teacher_text is None or teacher_image is None:
            raise ValueError("the KD term needs teacher_text and teacher_image (or weights.kd = 0)")
        tau_kd = temperature if kd_temperature is None else kd_temperature
        terms["kd"] = similarity_distill_loss(text, image, teacher_text, teacher_image, tau_kd)
    if weights.hn:
        if hard_negatives is None:
            raise ValueError("the hard-negative term needs hard_negatives (or weights.hn = 0)")
        terms["hn"] = hard_negative_loss(text, image, hard_negatives, temperature, hard_negative_mask)
    total = sum(getattr(weights, name) * value for name, value in terms.items() if getattr(weights, name))
    parts = {name: float(value.detach()) for name, value in terms.items()}
    parts["total"] = float(total.detach())
    return total, parts


def _diagonal_targets(rows: Tensor) -> Tensor:
    return torch.arange(rows.shape[0], device=rows.device)


def _kl_rows(target_logits: Tensor, student_logits: Tensor) -> Tensor:
    """(1/N) sum_i KL(softmax(target_i) || softmax(student_i))."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(target_logits, dim=1),
                    reduction="batchmean", log_target=True)
