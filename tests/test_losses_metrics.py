"""Losses and metrics against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import (
    IGNORE_INDEX,
    SegmentationLoss,
    cross_entropy,
    dice,
    focal,
    frequency_class_weights,
    lovasz_softmax,
    tversky,
)
from trainer.metrics import ConfusionMatrix, metrics_from_confusion


@pytest.fixture
def two_pixels():
    """Pixel A: p = (0.5, 0.5), label 0. Pixel B: p = (0.75, 0.25), label 1."""
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    return logits, target


def test_cross_entropy(two_pixels):
    logits, target = two_pixels
    ln2, ln4 = math.log(2), math.log(4)
    assert cross_entropy(logits, target).item() == pytest.approx((ln2 + ln4) / 2)
    assert cross_entropy(logits, target, [0.0, 1.0]).item() == pytest.approx(ln4)
    assert cross_entropy(logits, target, [1.0, 3.0]).item() == pytest.approx((ln2 + 3 * ln4) / 4)


def test_zero_weight_everywhere_is_zero_not_nan(two_pixels):
    logits, _ = two_pixels
    target = torch.tensor([[[0, 0]]])
    assert cross_entropy(logits, target, [0.0, 1.0]).item() == 0.0
    assert dice(logits, target, [0.0, 1.0]).item() == pytest.approx(0.0, abs=1e-6)


def test_ignore_index(two_pixels):
    logits, _ = two_pixels
    target = torch.tensor([[[IGNORE_INDEX, 1]]])
    assert cross_entropy(logits, target).item() == pytest.approx(math.log(4))


def test_focal(two_pixels):
    logits, target = two_pixels
    expected = (0.25 * math.log(2) + 0.5625 * math.log(4)) / 2
    assert focal(logits, target, gamma=2.0).item() == pytest.approx(expected)
    # gamma 0 is cross-entropy
    assert focal(logits, target, gamma=0.0).item() == pytest.approx(cross_entropy(logits, target).item())


def test_dice(two_pixels):
    logits, target = two_pixels
    # class 0: TP .5 FP .75 FN .5 ; class 1: TP .25 FP .5 FN .75
    d0, d1 = 1 / 2.25, 0.5 / 1.75
    assert dice(logits, target, eps=0.0).item() == pytest.approx(((1 - d0) + (1 - d1)) / 2)
    # background weight 0 leaves class 0 and its pixels out: only pixel B, class 1
    # TP .25, FP 0, FN .75 -> dice = .5 / (.5 + .75)
    assert dice(logits, target, [0.0, 1.0], eps=0.0).item() == pytest.approx(1 - 0.5 / 1.25)


def test_tversky_and_focal_tversky(two_pixels):
    logits, target = two_pixels
    t0 = 0.5 / (0.5 + 0.3 * 0.75 + 0.7 * 0.5)
    t1 = 0.25 / (0.25 + 0.3 * 0.5 + 0.7 * 0.75)
    assert tversky(logits, target, alpha=0.3, beta=0.7, eps=0.0).item() == pytest.approx(
        ((1 - t0) + (1 - t1)) / 2
    )
    ft = ((1 - t0) ** 0.75 + (1 - t1) ** 0.75) / 2
    assert tversky(logits, target, alpha=0.3, beta=0.7, gamma=0.75, eps=0.0).item() == pytest.approx(ft)
    # alpha = beta = 0.5 is Dice
    assert tversky(logits, target, alpha=0.5, beta=0.5, eps=0.0).item() == pytest.approx(
        dice(logits, target, eps=0.0).item()
    )


def test_lovasz_softmax(two_pixels):
    logits, target = two_pixels
    # class 0: errors sorted (.75 fg0, .5 fg1) -> grad (.5, .5) -> .625
    # class 1: errors sorted (.75 fg1, .5 fg0) -> grad (1, 0) -> .75
    assert lovasz_softmax(logits, target).item() == pytest.approx((0.625 + 0.75) / 2)


def test_overlap_and_lovasz_terms_are_class_weighted_means():
    """Tversky and Lovasz average their per-class losses weighted by the class weights,
    computed here class by class from their definitions."""
    from trainer.losses import _lovasz_grad

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7) * 2
    target = torch.arange(2 * 6 * 7).reshape(2, 6, 7) % 4  # every class present
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    p = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 4)
    y = torch.nn.functional.one_hot(target.reshape(-1), 4).float()
    tp, fp, fn = (p * y).sum(0), (p * (1 - y)).sum(0), ((1 - p) * y).sum(0)
    alpha, beta, gamma = 0.3, 0.7, 0.75
    ti = (tp + 1) / (tp + alpha * fp + beta * fn + 1)
    want = ((1 - ti) ** gamma * w).sum() / w.sum()
    got = tversky(logits, target, w, alpha=alpha, beta=beta, gamma=gamma)
    torch.testing.assert_close(got, want)
    per_class = []
    for c in range(4):
        errors = (y[:, c] - p[:, c]).abs()
        errors, perm = torch.sort(errors, descending=True)
        per_class.append(torch.dot(errors, _lovasz_grad(y[perm, c])))
    want = (torch.stack(per_class) * w).sum() / w.sum()
    torch.testing.assert_close(lovasz_softmax(logits, target, w), want)


def test_lovasz_equals_one_minus_iou_for_hard_predictions():
    """On confident predictions the Lovasz extension equals the Jaccard loss."""
    big = 50.0
    logits = torch.tensor([[[[big, big, -big, -big]], [[-big, -big, big, big]]]])
    target = torch.tensor([[[0, 1, 1, 1]]])
    # class 0: IoU 1/2 ; class 1: IoU 2/3
    assert lovasz_softmax(logits, target).item() == pytest.approx(((1 - 1 / 2) + (1 - 2 / 3)) / 2, abs=1e-4)


def test_combined_loss_and_argument_checks(two_pixels):
    logits, target = two_pixels
    loss = SegmentationLoss([("ce", 1.0), ("dice", 0.5)], [1.0, 1.0])
    expected = cross_entropy(logits, target).item() + 0.5 * dice(logits, target).item()
    assert loss(logits, target).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown loss 'bce'"):
        SegmentationLoss([("bce", 1.0)], [1.0, 1.0])
    with pytest.raises(ValueError, match="class weights"):
        SegmentationLoss([("ce", 1.0)], [0.0, 0.0])
    with pytest.raises(ValueError, match="must be >= 0"):
        SegmentationLoss([("ce", 1.0), ("dice", -0.5)], [1.0, 1.0])


def test_losses_have_gradients(two_pixels):
    logits, target = two_pixels
    logits = logits.clone().requires_grad_(True)
    loss = SegmentationLoss(
        [(n, 1.0) for n in ("ce", "focal", "dice", "tversky", "focal_tversky", "lovasz")], [0.5, 1.0]
    )
    loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    "terms",
    [
        [("ce", 1.0), ("dice", 1.0)],
        [("tversky", 1.0)],
        [("focal_tversky", 1.0)],
        [("focal", 1.0), ("dice", 0.5)],
    ],
)
def test_loss_gradients_against_finite_differences(terms, channels_last):
    """The softmax terms' backward is written out (``_SoftmaxTerms``): the gradient of each
    loss through it against finite differences, in float64, with ignored pixels, a class of
    weight 0 and a class absent from the batch, in both memory layouts."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (2, 3, 4))  # class 4 absent
    y[0, 0] = IGNORE_INDEX
    loss = SegmentationLoss(terms, [0.0, 1.0, 2.0, 0.0, 1.5])
    assert torch.autograd.gradcheck(lambda z: loss(z, y), (x.requires_grad_(),))


@pytest.mark.parametrize("outputs", ["own", "total", "both"])
def test_softmax_terms_gradients_against_finite_differences(outputs):
    """Either of the two outputs alone (the other's gradient never arrives) and both."""
    from trainer.losses import _SoftmaxTerms

    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    target, counted = torch.randint(0, 5, (2, 3, 4)), (torch.rand(2, 3, 4) > 0.3).double()
    pick = {"own": lambda o: o[0], "total": lambda o: o[1], "both": lambda o: o}[outputs]
    assert torch.autograd.gradcheck(
        lambda z: pick(_SoftmaxTerms.apply(z, target, counted)), (x.requires_grad_(),)
    )


def test_frequency_class_weights():
    w = frequency_class_weights([100, 400, 100, 100, 16], background_weight=0.0)
    assert w[0] == 0.0 and w[1] == pytest.approx(1.0)
    assert w[2] == pytest.approx(2.0) and w[4] == pytest.approx(5.0)  # sqrt(400 / 16), under the cap
    rare = frequency_class_weights([100, 400, 100, 100, 1], background_weight=0.0)
    assert rare[4] == pytest.approx(10.0)  # sqrt(400) = 20, capped at 10
    assert frequency_class_weights([1, 2, 3, 4, 5], 0.5, "none") == [0.5, 1.0, 1.0, 1.0, 1.0]


CONFUSION = [
    [5, 1, 0, 0, 0],
    [2, 10, 1, 0, 0],
    [0, 0, 8, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
]


def test_metrics_from_confusion_by_hand():
    m = metrics_from_confusion(CONFUSION)
    iou = m["iou"]
    assert iou[0] == pytest.approx(5 / 8)  # ordinary IoU for background
    assert iou[1] == pytest.approx(10 / 13)  # the pixel labelled background predicted soil is ignored
    assert iou[2] == pytest.approx(8 / 9)
    assert math.isnan(iou[3]) and math.isnan(iou[4])  # absent from labels and predictions
    assert m["miou"] == pytest.approx((10 / 13 + 8 / 9) / 2)
    assert m["pixel_accuracy"] == pytest.approx(18 / 21)


def test_confusion_matrix_accumulates_over_batches():
    cm = ConfusionMatrix()
    target = torch.tensor([[0, 1, 1, 2], [4, 4, 3, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 2, 2], [4, 1, 3, 0]])
    cm.update(pred[:1], target[:1])
    cm.update(pred[1:], target[1:])
    m = cm.matrix
    assert m.sum() == 7  # the ignored pixel is not counted
    assert m[1, 1] == 1 and m[1, 2] == 1 and m[4, 1] == 1 and m[3, 3] == 1
    r = cm.compute()
    assert r["iou"][4] == pytest.approx(1 / 2)
    assert r["iou"][2] == pytest.approx(1 / 2)


ALL_LOSSES = ("ce", "focal", "dice", "tversky", "focal_tversky", "lovasz")


def _edge_batch(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 5, H, W) logits and targets for the batches that break naive losses."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(1, 5, (2, 4, 6), generator=g)
    logits = torch.randn(2, 5, 4, 6, generator=g)
    if case == "all_background":  # confident and right: the loss is 0 and flat
        target = torch.zeros_like(target)
        logits = torch.full_like(logits, -40.0)
        logits[:, 0] = 40.0
    elif case == "all_ignored":
        target = torch.full_like(target, IGNORE_INDEX)
    elif case == "saturated":  # half confidently right, half confidently wrong
        logits = torch.full_like(logits, -40.0)
        right = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).bool()
        logits[right] = 40.0
        logits[:, 2, :2] = 80.0
    elif case == "class_absent":
        target = torch.where(target == 4, torch.ones_like(target), target)
    return logits, target


@pytest.mark.parametrize("case", ["all_background", "all_ignored", "saturated", "class_absent"])
@pytest.mark.parametrize("terms", [[(n, 1.0)] for n in ALL_LOSSES] + [[(n, 1.0) for n in ALL_LOSSES]])
def test_every_loss_has_finite_gradients_on_edge_batches(terms, case):
    """Background weight 0 (the default) makes all-background and all-ignored batches
    count nothing: the loss must be finite and its gradient finite, never NaN."""
    logits, target = _edge_batch(case)
    logits.requires_grad_(True)
    loss = SegmentationLoss(terms, [0.0, 1.0, 1.0, 1.0, 1.0])(logits, target)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(logits.grad).all(), f"{terms} on {case}: non-finite gradient"
    if case in ("all_background", "all_ignored"):
        assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_focal_tversky_on_background_only_batch_reproduces_the_report():
    """Logits +40 on background, target all background, class weights [0, 1, 1, 1, 1]."""
    logits = torch.full((1, 5, 2, 2), -40.0)
    logits[:, 0] = 40.0
    logits.requires_grad_(True)
    loss = SegmentationLoss([("focal_tversky", 1.0)], [0, 1, 1, 1, 1])(logits, torch.zeros(1, 2, 2).long())
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def _keras_mean_iou(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, ignore_class: int) -> float:
    """Keras 3 ``MeanIoU(num_classes, ignore_class=...)``, step by step as its source does:
    weights 1, times the valid mask; a weighted confusion matrix; IoU over classes whose
    denominator is positive."""
    valid = y_true != ignore_class
    weight = np.ones_like(y_true, dtype=np.float64) * valid
    cm = np.zeros((num_classes, num_classes))
    np.add.at(cm, ((y_true * valid).ravel(), (y_pred * valid).ravel()), weight.ravel())
    sum_over_row, sum_over_col = cm.sum(axis=0), cm.sum(axis=1)
    tp = np.diag(cm)
    denominator = sum_over_row + sum_over_col - tp
    num_valid = (denominator > 1e-9).sum()
    iou = tp / (denominator + 1e-7)
    return float(iou.sum() / (num_valid + 1e-7))


def test_miou_keras_by_hand_and_against_the_keras_algorithm():
    m = metrics_from_confusion(CONFUSION)
    # two soil pixels predicted background: Keras averages class 0 (IoU 0) as a third class
    assert m["miou_keras"] == pytest.approx((10 / 13 + 8 / 9) / 3)
    no_bg_pred = [row[:] for row in CONFUSION]
    no_bg_pred[1] = [0, 12, 1, 0, 0]
    m = metrics_from_confusion(no_bg_pred)
    assert m["miou_keras"] == pytest.approx(m["miou"])  # they differ only when terrain -> background
    rng = np.random.default_rng(0)
    for trial in range(20):
        target = rng.integers(0, 5, (3, 8, 8))
        pred = rng.integers(0 if trial % 2 else 1, 5, (3, 8, 8))
        if trial % 5 == 0:
            target[target == 4] = 1  # a class absent from labels
        cm = ConfusionMatrix()
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        ours = cm.compute()
        assert ours["miou_keras"] == pytest.approx(_keras_mean_iou(target, pred, 5, 0), abs=1e-6)


def test_the_loss_registry_and_the_config_agree():
    """config.py cannot import torch, so it keeps the names; they must be the registry's."""
    from trainer.config import LOSS_NAMES, TrainConfig
    from trainer.losses import LOSSES, LossParams

    assert tuple(LOSSES) == LOSS_NAMES
    params = LossParams.from_config(TrainConfig(focal_gamma=3.0))
    assert params.focal_gamma == 3.0  # every hyper-parameter is a config field of the same name


def test_confusion_counts_ignore_what_is_not_a_class_in_any_dtype():
    from trainer.metrics import ConfusionMatrix

    target = torch.tensor([[0, 1, 4, 255, 2, 3]])
    pred = torch.tensor([[0, 1, 3, 2, 2, 0]])
    want = torch.zeros(5, 5, dtype=torch.long)
    for t, p in [(0, 0), (1, 1), (4, 3), (2, 2), (3, 0)]:
        want[t, p] += 1
    for dtype in (torch.uint8, torch.int64, torch.int32):
        cm = ConfusionMatrix()
        cm.update(pred, target.to(dtype))
        assert torch.equal(cm.matrix.long(), want), dtype
    cm = ConfusionMatrix()
    cm.update(pred, torch.tensor([[0, 1, 4, -1, 2, 3]]))  # -1: outside the classes, ignored
    assert torch.equal(cm.matrix.long(), want)


@pytest.mark.parametrize("terms", [[(n, 1.0)] for n in ALL_LOSSES])
def test_every_loss_takes_uint8_targets_as_the_dataset_stores_them(terms):
    """Training passes the masks as uint8 (255 = ignored): the same loss and gradient as
    int64 targets."""
    logits, target = _edge_batch("saturated")
    logits = logits * 0.05 + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    target = target.clone()
    target[:, :1] = IGNORE_INDEX
    loss_fn = SegmentationLoss(terms, [0.0, 1.0, 2.0, 1.0, 1.0])
    grads = []
    for t in (target, target.to(torch.uint8)):
        lg = logits.clone().requires_grad_(True)
        loss = loss_fn(lg, t)
        loss.backward()
        grads.append((loss.detach(), lg.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


class _HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators that make the host wait for a GPU: a value read back, or an
    output whose size depends on the values (nonzero, boolean indexing, bincount)."""

    WAITING = {"nonzero", "bincount", "_local_scalar_dense", "masked_select", "unique", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name == "index" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else [])
        )
        if name in self.WAITING or bool_index:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("terms", ["ce:1,dice:1", "focal:1,tversky:1", "focal_tversky:1"])
def test_the_loss_never_makes_the_host_wait(terms):
    """On a GPU each of these stops the host queuing work until the GPU has caught up, in
    the middle of every step (and CUDA graphs cannot hold them). Lovasz sorts the pixels
    of each class present, and so must read the classes back: it is left out."""
    from trainer.config import parse_loss_spec

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 16, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 16), dtype=torch.uint8)
    target[0, :2] = IGNORE_INDEX
    loss_fn = SegmentationLoss(parse_loss_spec(terms), [0, 1, 1, 1, 2])
    with _HostWaits() as waits:
        loss_fn(logits, target).backward()
    assert waits.seen == []


def test_a_training_step_never_makes_the_host_wait():
    """The whole step (batch augmentation, forward, the preset's loss, backward, the finite
    check, AdamW) queues its work without reading anything back: the host reads the loss
    once every ``log_every`` steps, nothing else."""
    from trainer.config import preset
    from trainer.control import TrainControl
    from trainer.engine import _Trainer
    from trainer.synth import generate

    d = generate(40, 0, seed=0).dataset
    cfg = preset("tiny").replace(device="cpu", loss="ce:1,dice:1", augment=True)
    run = _Trainer(d, cfg, None, TrainControl(), None, None)
    images, masks = torch.from_numpy(d.images[:4]), torch.from_numpy(d.masks[:4])
    run.train_step(images, masks)
    with _HostWaits() as waits:
        run.train_step(images, masks)
    assert waits.seen == []
