"""Loss terms against hand-computed references (explicit loops with math.exp/math.log)."""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from clipgrep.compress.losses import (
    LossWeights,
    contrastive_losses,
    hard_negative_loss,
    intra_modal_distill_loss,
    similarity_distill_loss,
    stage2_loss,
)

Vectors = list[list[float]]


def unit(degrees: float) -> list[float]:
    """A 2-D unit vector: dot products are cosines of angle differences, easy to reason about."""
    r = math.radians(degrees)
    return [math.cos(r), math.sin(r)]


def tensor(rows: Vectors, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def info_nce(anchor: list[float], positive: list[float], others: Vectors, tau: float) -> float:
    """-log(exp(s(a,p)/tau) / (exp(s(a,p)/tau) + sum_o exp(s(a,o)/tau)))."""
    numerator = math.exp(dot(anchor, positive) / tau)
    denominator = numerator + sum(math.exp(dot(anchor, o) / tau) for o in others)
    return -math.log(numerator / denominator)


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


TEXT = [unit(0), unit(50), unit(130)]
IMAGE = [unit(20), unit(60), unit(100)]


def test_intra_modal_matches_hand_computation() -> None:
    student, teacher, tau = [unit(10), unit(80)], [unit(0), unit(90)], 0.5
    expected = (info_nce(student[0], teacher[0], [teacher[1]], tau)
                + info_nce(student[1], teacher[1], [teacher[0]], tau)) / 2
    assert intra_modal_distill_loss(tensor(student), tensor(teacher), tau).item() == pytest.approx(expected)


def test_intra_modal_queue_adds_teacher_negatives() -> None:
    student, teacher, tau = [unit(10), unit(80)], [unit(0), unit(90)], 0.5
    queue = [unit(15), unit(200)]
    expected = (info_nce(student[0], teacher[0], [teacher[1], *queue], tau)
                + info_nce(student[1], teacher[1], [teacher[0], *queue], tau)) / 2
    loss = intra_modal_distill_loss(tensor(student), tensor(teacher), tau, queue=tensor(queue))
    assert loss.item() == pytest.approx(expected)


def test_intra_modal_queue_item_closer_to_student_costs_more() -> None:
    student, teacher = tensor([unit(10), unit(80)]), tensor([unit(0), unit(90)])
    without = intra_modal_distill_loss(student, teacher, 0.1).item()
    far = intra_modal_distill_loss(student, teacher, 0.1, queue=tensor([unit(250)])).item()
    near = intra_modal_distill_loss(student, teacher, 0.1, queue=tensor([unit(12)])).item()
    assert without < far < near


def test_intra_modal_gradients_reach_the_student_only() -> None:
    student, teacher, queue = tensor([unit(10), unit(80)], True), tensor([unit(0), unit(90)], True), tensor(
        [unit(30)], True)
    intra_modal_distill_loss(student, teacher, 0.1, queue=queue).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and queue.grad is None


def test_contrastive_losses_match_hand_computation() -> None:
    tau = 0.2
    t2v = sum(info_nce(TEXT[i], IMAGE[i], [IMAGE[j] for j in range(3) if j != i], tau) for i in range(3)) / 3
    v2t = sum(info_nce(IMAGE[i], TEXT[i], [TEXT[j] for j in range(3) if j != i], tau) for i in range(3)) / 3
    l_t2v, l_v2t = contrastive_losses(tensor(TEXT), tensor(IMAGE), tau)
    assert l_t2v.item() == pytest.approx(t2v)
    assert l_v2t.item() == pytest.approx(v2t)
    assert t2v != pytest.approx(v2t)  # the two directions really differ on these vectors


def test_similarity_distill_matches_hand_computation() -> None:
    teacher_text, teacher_image = [unit(0), unit(90), unit(180)], [unit(10), unit(95), unit(170)]
    tau = 0.5

    def sim(a: Vectors, b: Vectors, i: int, j: int) -> float:
        return dot(a[i], b[j]) / tau

    rows = [kl(softmax([sim(teacher_text, teacher_image, i, j) for j in range(3)]),
               softmax([sim(TEXT, IMAGE, i, j) for j in range(3)])) for i in range(3)]
    cols = [kl(softmax([sim(teacher_text, teacher_image, i, j) for i in range(3)]),
               softmax([sim(TEXT, IMAGE, i, j) for i in range(3)])) for j in range(3)]
    expected = (sum(rows) / 3 + sum(cols) / 3) / 2
    loss = similarity_distill_loss(tensor(TEXT), tensor(IMAGE), tensor(teacher_text), tensor(teacher_image), tau)
    assert loss.item() == pytest.approx(expected)


def test_similarity_distill_target_is_the_teacher_pair() -> None:
    # The [3P] bug (student as its own target) would give 0 here; the teacher target does not.
    teacher_text, teacher_image = tensor([unit(0), unit(90), unit(180)]), tensor([unit(10), unit(95), unit(170)])
    assert similarity_distill_loss(tensor(TEXT), tensor(IMAGE), teacher_text, teacher_image, 0.5).item() > 1e-3
    same = similarity_distill_loss(teacher_text, teacher_image, teacher_text, teacher_image, 0.5)
    assert same.item() == pytest.approx(0.0, abs=1e-12)


def test_similarity_distill_gradients_reach_the_students_only() -> None:
    student_text, student_image = tensor(TEXT, True), tensor(IMAGE, True)
    teacher_text, teacher_image = tensor([unit(5), unit(45), unit(140)], True), tensor(IMAGE, True)
    similarity_distill_loss(student_text, student_image, teacher_text, teacher_image, 0.5).backward()
    assert student_text.grad.abs().sum() > 0 and student_image.grad.abs().sum() > 0
    assert teacher_text.grad is None and teacher_image.grad is None


def test_hard_negative_loss_matches_hand_computation_with_mask() -> None:
    anchor, positive = [unit(0), unit(90)], [unit(10), unit(100)]
    negatives = [[unit(20), unit(-30)], [unit(80), unit(0)]]
    tau = 0.3
    # Row 1's second negative is padding: it must not count.
    expected = (info_nce(anchor[0], positive[0], negatives[0], tau)
                + info_nce(anchor[1], positive[1], negatives[1][:1], tau)) / 2
    mask = torch.tensor([[True, True], [True, False]])
    loss = hard_negative_loss(tensor(anchor), tensor(positive), tensor(negatives), tau, mask)
    assert loss.item() == pytest.approx(expected)
    unmasked = hard_negative_loss(tensor(anchor), tensor(positive), tensor(negatives), tau)
    assert unmasked.item() > loss.item()


def test_hard_negative_row_without_negatives_is_zero_and_finite() -> None:
    anchor, positive = tensor([unit(0)], True), tensor([unit(40)])
    negatives = tensor([[unit(5), unit(6)]], True)
    loss = hard_negative_loss(anchor, positive, negatives, 0.1, torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(negatives.grad).all()


def test_stage2_loss_is_the_weighted_sum_of_its_terms() -> None:
    text, image = tensor(TEXT), tensor(IMAGE, True)
    teacher_text, teacher_image = tensor(TEXT), tensor([unit(15), unit(70), unit(110)])
    negatives = tensor([[unit(30), unit(-10)], [unit(200), unit(45)], [unit(120), unit(140)]])
    weights = LossWeights(t2v=1.0, v2t=0.5, kd=2.0, hn=3.0)
    total, parts = stage2_loss(text, image, 0.2, weights, teacher_text=teacher_text, teacher_image=teacher_image,
                               kd_temperature=0.5, hard_negatives=negatives)
    l_t2v, l_v2t = contrastive_losses(text, image, 0.2)
    kd = similarity_distill_loss(text, image, teacher_text, teacher_image, 0.5)
    hn = hard_negative_loss(text, image, negatives, 0.2)
    assert parts["t2v"] == pytest.approx(l_t2v.item()) and parts["v2t"] == pytest.approx(l_v2t.item())
    assert parts["kd"] == pytest.approx(kd.item()) and parts["hn"] == pytest.approx(hn.item())
    expected = l_t2v.item() + 0.5 * l_v2t.item() + 2.0 * kd.item() + 3.0 * hn.item()
    assert total.item() == pytest.approx(expected) and parts["total"] == pytest.approx(expected)
    total.backward()
    assert image.grad.abs().sum() > 0


def test_stage2_loss_skips_zero_weight_terms() -> None:
    # Missing KD and HN inputs are fine when their weights are 0: those terms are never computed.
    total, parts = stage2_loss(tensor(TEXT), tensor(IMAGE), 0.2, LossWeights(kd=0.0, hn=0.0))
    assert set(parts) == {"t2v", "v2t", "total"}
    assert total.item() == pytest.approx(parts["t2v"] + parts["v2t"])
    _, parts = stage2_loss(tensor(TEXT), tensor(IMAGE), 0.2, LossWeights(t2v=0, v2t=0, kd=0),
                           hard_negatives=tensor([[unit(30)], [unit(0)], [unit(90)]]))
    assert set(parts) == {"hn", "total"}


def test_stage2_loss_refuses_missing_inputs_and_bad_weights() -> None:
    with pytest.raises(ValueError, match="teacher"):
        stage2_loss(tensor(TEXT), tensor(IMAGE), 0.2, LossWeights(hn=0.0))
    with pytest.raises(ValueError, match="hard_negatives"):
        stage2_loss(tensor(TEXT), tensor(IMAGE), 0.2, LossWeights(kd=0.0))
    with pytest.raises(ValueError):
        LossWeights(t2v=0, v2t=0, kd=0, hn=0)
    with pytest.raises(ValueError):
        LossWeights(kd=-1.0)
