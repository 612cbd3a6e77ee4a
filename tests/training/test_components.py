"""Losses, EMA teacher, pseudo-labels and ClassMix: small components of the training step."""

from __future__ import annotations

from dataclasses import dataclass as dataclass_sample
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.uda.losses import cdf_loss, corrected_cross_entropy, weighted_cross_entropy
from training.uda.mixing import class_masks, classmix, strong_augment
from training.uda.pseudo_labels import pseudo_labels_from_probs, teacher_probabilities
from training.uda.teacher import EmaTeacher, ema_alpha


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0, :2] = 255
    return logits, labels


def test_weighted_cross_entropy_against_a_loop() -> None:
    logits, labels = _batch()
    w = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(1))
    got = weighted_cross_entropy(logits, labels, w)
    total, n = 0.0, 0
    for i in range(2):
        for y in range(3):
            for x in range(5):
                if labels[i, y, x] == 255:
                    continue
                lp = torch.log_softmax(logits[i, :, y, x], 0)[labels[i, y, x]]
                total += float(-lp.detach() * w[i, y, x])
                n += 1
    assert float(got) == pytest.approx(total / n, rel=1e-5)
    assert float(weighted_cross_entropy(logits, labels)) == pytest.approx(
        float(F.cross_entropy(logits, labels, ignore_index=255)), rel=1e-6
    )


def test_corrected_cross_entropy_shifts_logits_and_detaches_delta() -> None:
    logits, labels = _batch()
    delta = torch.randn(2, 4, 3, 5, requires_grad=True)
    loss = corrected_cross_entropy(logits, labels, delta, t=0.1)
    ref = F.cross_entropy(logits - 0.1 * delta.detach(), labels, ignore_index=255)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    loss.backward()
    assert delta.grad is None and logits.grad is not None
    # Δ that is the same for every class changes nothing (softmax is shift-invariant).
    same = corrected_cross_entropy(logits, labels, torch.ones(2, 1, 3, 5).expand(2, 4, 3, 5), t=0.1)
    assert float(same) == pytest.approx(float(weighted_cross_entropy(logits, labels)), rel=1e-6)


def test_cdf_loss_is_masked_l1() -> None:
    cdf = torch.tensor([[[[0.2, 0.9]]]])
    target = torch.tensor([[[0.5, 0.0]]])
    valid = torch.tensor([[[True, False]]])
    assert float(cdf_loss(cdf, target, valid)) == pytest.approx(0.3)


def test_ema_teacher_update_formula_and_ramp() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = EmaTeacher(student)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, 0.9)
    for b, t, s in zip(before, teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
        assert not t.requires_grad
    assert ema_alpha(0, 0.99) == 0.0 and ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(10_000, 0.99) == 0.99


def test_pseudo_labels_weight_and_all_reduced_statistics() -> None:
    probs = torch.tensor([[[[0.99, 0.5]], [[0.01, 0.5]]]])  # (1, 2, 1, 2)
    pl = pseudo_labels_from_probs(probs, threshold=0.968)
    assert pl.labels.tolist() == [[[0, 0]]] and pl.weight == 0.5
    # A fake all-reduce that adds another process holding 2 confident pixels of class 1 out of 2.
    other = torch.tensor([2.0, 2.0, 0.0, 2.0], dtype=torch.float64)
    pl2 = pseudo_labels_from_probs(probs, 0.968, reduce=lambda x: x + other)
    assert pl2.weight == pytest.approx(3 / 4)
    assert pl2.class_counts.tolist() == [2.0, 2.0]


def test_teacher_probabilities_upsample_and_use_scores() -> None:
    logits = torch.randn(1, 3, 2, 2)
    p = teacher_probabilities(logits, (4, 4))
    assert p.shape == (1, 3, 4, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 4, 4))
    q = teacher_probabilities(logits, (2, 2), scores=lambda z: torch.zeros_like(z) + 0.25)
    assert float(q.max()) == 0.25


def test_classmix_uses_the_explicit_domain_mask() -> None:
    g = torch.Generator().manual_seed(0)
    src_img, tgt_img = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    src_lab = torch.randint(0, 5, (2, 4, 4), generator=g)
    tgt_lab = torch.full((2, 4, 4), 7)
    mask = class_masks(src_lab, g)
    # Source weight 1 equals the target weight here: the domain must still come from the mask.
    mixed = classmix(src_img, src_lab, tgt_img, tgt_lab, 1.0, mask)
    assert torch.equal(mixed.source_mask, mask)
    assert torch.equal(mixed.images[:, 0] == 0, mask)
    assert torch.equal(mixed.labels, torch.where(mask, src_lab, tgt_lab))
    w = classmix(src_img, src_lab, tgt_img, tgt_lab, 0.3, mask).weights
    assert torch.equal(w, torch.where(mask, torch.tensor(1.0), torch.tensor(0.3)))


def test_class_masks_take_half_of_each_images_classes() -> None:
    labels = torch.tensor([[[0, 1], [2, 3]], [[5, 5], [255, 6]]])
    masks = class_masks(labels, torch.Generator().manual_seed(1))
    for lab, m in zip(labels, masks, strict=True):
        present = [c for c in torch.unique(lab).tolist() if c != 255]
        chosen = {int(c) for c in lab[m].tolist()}
        assert len(chosen) == (len(present) + 1) // 2 and chosen <= set(present)
        assert not bool(m[lab == 255].any())


def test_strong_augment_is_seeded_and_keeps_range() -> None:
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    x = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - mean.view(1, 3, 1, 1)) / 0.25
    a = strong_augment(x, mean, std, 0.3, True, torch.Generator().manual_seed(5))
    b = strong_augment(x, mean, std, 0.3, True, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    pixels = a * 0.25 + 0.5
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    torch.testing.assert_close(strong_augment(x, mean, std, 0.0, False), x)
    assert np.isfinite(a.numpy()).all()


def test_teacher_batch_statistics_leave_running_statistics_alone() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = student

        def forward(self, x: torch.Tensor) -> Any:
            return type("Out", (), {"logits": self.net(x)})()

    teacher = EmaTeacher(Wrap())
    net: Any = teacher.module.net
    bn = net[1]
    before = bn.running_mean.clone()
    x = torch.randn(3, 3, 5, 5) * 4 + 2
    out = teacher(x, batch_stats=True)
    assert torch.equal(bn.running_mean, before) and not bn.training
    ref = net[2](F.batch_norm(net[0](x), None, None, bn.weight, bn.bias, True))
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(teacher(x), out)  # running statistics differ from the batch's


def test_adabn_recalibration_averages_over_the_images() -> None:
    from training.uda.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(2))

    @dataclass_sample
    class _S:
        image: np.ndarray
        label: np.ndarray

    rng = np.random.default_rng(0)
    data = [
        _S(rng.integers(0, 256, (4, 6, 3)).astype(np.uint8), np.zeros((4, 6), np.uint8)) for _ in range(5)
    ]
    # One image per batch: the cumulative average of batch means is the mean over all images.
    recalibrate_batchnorm(model, data, scale=1.0, count=5, batch=1)
    from training.networks import images_to_tensor

    with torch.no_grad():
        feats = conv(images_to_tensor(np.stack([d.image for d in data])))  # (5, 2, 4, 6)
    torch.testing.assert_close(model[1].running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert model[1].momentum == 0.1
