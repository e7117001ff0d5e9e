"""U-Net shapes and options, the config (presets, TOML, refusals) and batched augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.augment import augment_batch, oversampling_weights
from trainer.config import (
    ConfigError,
    TrainConfig,
    build,
    from_dict,
    load_toml,
    parse_loss_spec,
    preset,
    to_toml,
)
from trainer.losses import IGNORE_INDEX
from trainer.model import UNet, build_model, fold_batch_norm


@pytest.mark.parametrize("shape", [(64, 128), (60, 100), (17, 33)])
def test_unet_pads_and_crops_any_size(shape):
    model = UNet(depth=3, base_width=8).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *shape))
    assert out.shape == (2, 5, *shape)


@pytest.mark.parametrize(
    "opts",
    [
        dict(residual=True),
        dict(squeeze_excitation=True),
        dict(attention_gates=True),
        dict(
            norm="group",
            base_width=8,
            residual=True,
            squeeze_excitation=True,
            attention_gates=True,
            dropout=0.1,
        ),
        dict(norm="none"),
    ],
)
def test_unet_options_train(opts):
    torch.manual_seed(0)
    model = UNet(depth=2, **{"base_width": 8, **opts})
    x = torch.rand(2, 1, 32, 64)
    out = model(x)
    out.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _upsample_then_reduce(model: UNet, x: torch.Tensor) -> torch.Tensor:
    """The decoder as the U-Net was first written: upsample, then the 1x1 reduce."""
    import torch.nn.functional as F

    skips = model.encode(x)
    x = skips.pop()
    for i in reversed(range(model.depth)):
        up = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
        x = model.decoders[i](torch.cat([skips[i], model.reduce[i](up)], dim=1))
    return model.head(x)


def test_reducing_before_upsampling_is_the_same_function():
    """The decoder reduces channels before it upsamples (cheaper); the two commute, so a
    checkpoint trained either way predicts the same."""
    torch.manual_seed(0)
    model = UNet(depth=3, base_width=8).eval()
    for m in model.reduce:
        m.bias.data.uniform_(-1, 1)  # a bias commutes too: the interpolation weights sum to 1
    x = torch.rand(2, 1, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _upsample_then_reduce(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_skip_concatenation_gradients(channels_last):
    """The decoder's concatenation gives each input its own gradient (the right part of
    it), in the layout the network runs in rather than a strided slice."""
    from trainer.model import _cat_channels

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a = torch.rand(2, 3, 4, 5).contiguous(memory_format=fmt).requires_grad_()
    b = torch.rand(2, 6, 4, 5).contiguous(memory_format=fmt).requires_grad_()
    g = torch.rand(2, 9, 4, 5).contiguous(memory_format=fmt)
    out = _cat_channels(a, b)
    assert torch.equal(out, torch.cat([a, b], dim=1))
    # autograd.grad gives the gradients as the op returns them (.grad would be re-laid out
    # to match the leaf)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    assert torch.equal(ga, g[:, :3]) and torch.equal(gb, g[:, 3:])
    assert ga.is_contiguous(memory_format=fmt) and gb.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(
        _cat_channels, (a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
    )


@pytest.mark.parametrize("opts", [dict(), dict(residual=True, squeeze_excitation=True, attention_gates=True)])
def test_folded_batch_norm_predicts_what_the_model_does(opts):
    torch.manual_seed(0)
    model = UNet(depth=2, base_width=8, **opts)
    for m in model.modules():  # statistics far from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model.train())
    assert model.training  # the model passed in is left as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(3, 1, 32, 64)
    with torch.no_grad():
        want = model.eval()(x)
        got = folded(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert fold_batch_norm(folded) is folded  # nothing left to fold: no second copy


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_predicting_leaves_a_training_models_mode_alone(norm):
    """Validation, previews and predictions take a model in the middle of training: it
    must come back in training mode (dropout and normalisation as training has them)
    whatever its normalisation, with nothing to restore by the caller."""
    import numpy as np

    from trainer.inference import confusion_on, predict_arrays
    from trainer.tiling import frames_confusion, predict_tiled

    torch.manual_seed(0)
    model = UNet(depth=2, base_width=8, norm=norm, dropout=0.2).train()
    images = torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8)
    masks = torch.randint(0, 5, (3, 32, 64), dtype=torch.uint8)

    class Frames:
        image = staticmethod(lambda i: images[i].numpy())
        mask = staticmethod(lambda i: masks[i].numpy())

    predict_arrays(model, images.numpy(), with_entropy=True)
    confusion_on(model, images, masks, np.arange(3), 2)
    predict_tiled(model, images[0].numpy(), tile=16, overlap=8)
    for _ in frames_confusion(model, Frames(), range(3), "cpu"):
        pass
    assert all(m.training for m in model.modules())
    folded = fold_batch_norm(model)
    assert folded is not model and not folded.training and fold_batch_norm(folded) is folded


def test_prediction_entropy_progress_and_confident_pixels():
    import numpy as np

    from trainer.inference import keep_confident, predict_arrays

    torch.manual_seed(0)
    model = UNet(depth=2, base_width=8)
    with torch.no_grad():
        model.head.weight.mul_(20)  # confident somewhere, doubtful elsewhere
    images = torch.randint(0, 256, (5, 32, 64), dtype=torch.uint8).numpy()
    seen = []
    out = predict_arrays(
        model, images, batch_size=2, with_probs=True, with_entropy=True, probs_dtype=np.float32,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert seen == [(2, 5), (4, 5), (5, 5)]
    p = out["probs"].astype(np.float64)
    nats = -(p * np.log(np.clip(p, 1e-8, None))).sum(1)  # entropy in nats, over the classes
    np.testing.assert_allclose(out["entropy"].astype(np.float64), nats, atol=2e-3)
    assert out["entropy"].max() > 0.5 and out["entropy"].min() >= 0
    masks = np.array([[1, 2, 3, 4]], np.uint8)
    confidence = np.array([[0.25, 0.5, 0.75, 1.0]], np.float32)
    # below the threshold: background ("not labelled"); at it or above: kept
    assert keep_confident(masks, confidence, 0.5).tolist() == [[0, 2, 3, 4]]
    assert keep_confident(masks, confidence, 0.0) is masks


def test_inference_runs_the_folded_model(monkeypatch):
    """Validation and prediction run without the normalisation passes."""
    from trainer import inference

    seen = []
    monkeypatch.setattr(torch.nn.BatchNorm2d, "forward", lambda self, x: seen.append(1) or x)
    model = UNet(depth=2, base_width=8)
    images = torch.randint(0, 256, (4, 32, 64), dtype=torch.uint8)
    inference.predict_arrays(model, images.numpy(), batch_size=2)
    inference.confusion_on(model, images, images % 5, np.arange(4), 2)
    assert not seen
    assert model.training  # confusion_on gives the model back in the mode it came in


def test_images_enter_the_model_as_0_to_1():
    """Training, prediction and the exported models (which divide by 255 themselves, as
    their users' code must) see a uint8 image the same way: 0 -> 0.0, 255 -> 1.0."""
    from trainer.inference import to_input

    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    x = to_input(u8, torch.device("cpu"))
    assert x.shape == (1, 1, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.flatten().numpy(), np.arange(256, dtype=np.float32) / 255.0)


def test_build_model_from_config_counts_grow_with_width():
    small = build_model(preset("tiny"))
    big = build_model(preset("gpu"))
    assert sum(p.numel() for p in big.parameters()) > 50 * sum(p.numel() for p in small.parameters())


def test_presets_and_defaults():
    assert preset("cpu") == TrainConfig()
    assert preset("gpu").depth == 4 and preset("gpu").base_width >= 32
    assert preset("tiny").depth == 2
    assert build(device_kind="cuda") == preset("gpu")
    assert build(device_kind="cpu") == preset("cpu")


def test_unknown_keys_and_bad_values_list_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) depht; valid: depth, base_width"):
        from_dict({"depht": 3})
    with pytest.raises(ConfigError, match=r"norm: 'layer' is not valid; valid: batch, group, none"):
        TrainConfig(norm="layer")
    with pytest.raises(ConfigError, match="batch_size must be int"):
        from_dict({"batch_size": "32"})
    with pytest.raises(ConfigError, match="lr: must be between 0 and 1"):
        TrainConfig(lr=5.0)
    with pytest.raises(ConfigError, match="unknown loss 'bce'; valid: ce, focal"):
        TrainConfig(loss="ce:1,bce:1")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(val_fraction=0.0), "val_fraction: must be in"),
        (dict(val_fraction=0.95), "val_fraction: must be in"),
        (dict(batch_size=0), "batch_size: must be at least 1"),
        (dict(depth=0), "depth: must be at least 1"),
        (dict(depth=7), "depth: at most 6"),
        (dict(base_width=0), "base_width: must be at least 1"),
        (dict(log_every=0), "log_every: must be at least 1"),
        (dict(epochs=-1), "epochs: must be >= 0"),
        (dict(epochs=0, minutes=0.0), "epochs and minutes are both 0"),
        (dict(dropout=1.0), "dropout: must be in"),
        (dict(precision="fp16"), "precision: 'fp16' is not valid; valid: auto, fp32, bf16"),
        (dict(norm="group", base_width=12), "multiple of 8"),
    ],
)
def test_config_refuses_values_that_cannot_train(changes, says):
    with pytest.raises(ConfigError, match=says):
        TrainConfig(**changes)


def test_loss_spec():
    assert parse_loss_spec("ce:1, dice:0.5 ,lovasz") == [("ce", 1.0), ("dice", 0.5), ("lovasz", 1.0)]


def test_toml_round_trip_and_precedence(tmp_path):
    cfg = preset("tiny").replace(loss="focal_tversky:1", hflip=False, lr=0.004)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert from_dict(load_toml(path)) == cfg
    table = tmp_path / "t.toml"
    table.write_text("[train]\ndepth = 2\nepochs = 7\n")
    built = build("cpu", table, {"epochs": 9, "seed": None})
    assert built.depth == 2 and built.epochs == 9
    bad = tmp_path / "bad.toml"
    bad.write_text("depth = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def _batch(b=6, h=16, w=24):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, h, w, generator=g)
    y = torch.randint(0, 5, (b, h, w), generator=g)
    return x, y


def test_augment_identity_when_everything_is_off():
    cfg = TrainConfig(hflip=False, max_rotation=0, max_scale=0, max_shift=0, photometric=0)
    x, y = _batch()
    ax, ay = augment_batch(x, y, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ax, x, atol=1e-5, rtol=0)
    assert torch.equal(ay, y)


def test_augment_keeps_the_mask_dtype_and_values():
    """uint8 masks (as training passes them) come out uint8, equal to int64 ones."""
    cfg = TrainConfig(max_rotation=20, max_scale=0.2, max_shift=0.1)
    x, y = _batch(b=8)
    a8 = augment_batch(x, y.to(torch.uint8), cfg, torch.Generator().manual_seed(4))
    a64 = augment_batch(x, y.long(), cfg, torch.Generator().manual_seed(4))
    assert a8[1].dtype == torch.uint8 and a64[1].dtype == torch.int64
    assert torch.equal(a8[1].long(), a64[1]) and torch.equal(a8[0], a64[0])
    assert (a8[1] == IGNORE_INDEX).any()  # pixels from outside the image are ignored


def test_augment_keeps_image_and_mask_aligned():
    """A pure horizontal flip moves image and mask together."""
    cfg = TrainConfig(hflip=True, max_rotation=0, max_scale=0, max_shift=0, photometric=0)
    x, y = _batch(b=32)
    ax, ay = augment_batch(x, y, cfg, torch.Generator().manual_seed(3))
    flipped = (ay != y).flatten(1).any(1)
    assert 0 < flipped.sum() < 32
    assert torch.equal(ay[flipped], y[flipped].flip(-1))
    torch.testing.assert_close(ax[flipped], x[flipped].flip(-1), atol=1e-5, rtol=0)


def _class_coded(masks: torch.Tensor) -> torch.Tensor:
    """An image whose intensity encodes the class of each pixel (0, 0.25, ... 1)."""
    return (masks.float() / 4)[:, None]


@pytest.mark.parametrize(
    "changes",
    [
        dict(max_rotation=20.0),
        dict(max_scale=0.3),
        dict(max_shift=0.2),
        dict(max_rotation=20.0, max_scale=0.3, max_shift=0.2, hflip=True),
    ],
    ids=["rotation", "zoom", "shift", "all"],
)
def test_augment_moves_image_and_mask_together(changes):
    """On real-shaped masks (64x128 synthetic terrain), every geometric change keeps the
    augmented image's class code equal to the augmented mask on the valid pixels (a mask
    rotated the other way from its image agrees on about two thirds)."""
    from trainer.synth import generate

    masks = torch.from_numpy(generate(24, 0, seed=4, plant_problems=False).dataset.masks).long()
    base = dict(hflip=False, max_rotation=0.0, max_scale=0.0, max_shift=0.0, photometric=0.0)
    cfg = TrainConfig(**{**base, **changes})
    ax, ay = augment_batch(_class_coded(masks), masks, cfg, torch.Generator().manual_seed(5))
    valid = ay != IGNORE_INDEX
    decoded = (ax[:, 0] * 4).round().long()
    agreement = (decoded[valid] == ay[valid]).float().mean().item()
    assert agreement > 0.97, agreement
    assert not torch.equal(ay, masks)  # something moved


def test_rotation_is_a_rotation_in_pixel_space():
    """On a 64x128 image the sampling matrix, taken back to pixel units, is a scaled
    rotation (orthogonal columns of equal length) whose angle is the one drawn: no shear."""
    from trainer.augment import affine_theta

    h, w = 64, 128
    cfg = TrainConfig(hflip=False, max_rotation=30.0, max_scale=0.0, max_shift=0.0)
    theta = affine_theta(64, (h, w), cfg, torch.Generator().manual_seed(0)).double()
    to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64))
    pixel = torch.linalg.inv(to_norm) @ theta[:, :, :2] @ to_norm  # (B, 2, 2) in pixels
    gram = pixel.transpose(1, 2) @ pixel
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64).expand_as(gram), atol=1e-6, rtol=0)
    angles = torch.rad2deg(torch.atan2(pixel[:, 1, 0], pixel[:, 0, 0]))
    assert angles.abs().max() <= 30.0 and angles.abs().max() > 20.0


def test_zoom_and_shift_stay_within_their_settings_and_span_them():
    from trainer.augment import affine_theta

    cfg = TrainConfig(max_rotation=0.0, max_scale=0.1, max_shift=0.06, hflip=False)
    theta = affine_theta(512, (64, 128), cfg, torch.Generator().manual_seed(3)).double()
    scale = 1 / theta[:, 0, 0]  # no rotation: the diagonal is 1 / zoom
    assert scale.min() >= 0.9 - 1e-6 and scale.max() <= 1.1 + 1e-6
    assert scale.min() < 0.92 and scale.max() > 1.08  # zooms in and out
    for shift in (theta[:, 0, 2], theta[:, 1, 2]):  # in -1..1 coordinates: 2 x the image share
        assert shift.abs().max() <= 0.12 + 1e-6 and shift.min() < -0.1 and shift.max() > 0.1


def test_photometric_changes_keep_to_their_strength():
    """On a ramp of grey, each image's contrast times its gamma's slope stays within what
    +-20% contrast and gamma exp(+-0.2) can give around mid-grey, and varies."""
    cfg = TrainConfig(hflip=False, max_rotation=0, max_scale=0, max_shift=0, photometric=1.0)
    x = torch.linspace(0.3, 0.7, 64 * 128).reshape(1, 1, 64, 128).repeat(64, 1, 1, 1)
    y = torch.zeros(64, 64, 128, dtype=torch.uint8)
    ax, _ = augment_batch(x, y, cfg, torch.Generator().manual_seed(2))
    xs, ys = x.flatten(1) - 0.5, ax.flatten(1)
    slope = ((xs * (ys - ys.mean(1, keepdim=True))).sum(1) / (xs * xs).sum(1)).numpy()
    assert slope.min() > 0.5 and slope.max() < 1.8, (slope.min(), slope.max())
    assert slope.min() < 0.85 and slope.max() > 1.15
    brightness = (ax.mean((1, 2, 3)) - 0.5).abs()
    assert brightness.max() < 0.25 and brightness.max() > 0.05


def test_augment_values_stay_valid():
    cfg = TrainConfig(max_rotation=20, max_scale=0.3, max_shift=0.2)
    x, y = _batch(b=16)
    ax, ay = augment_batch(x, y, cfg, torch.Generator().manual_seed(2))
    assert ax.min() >= 0 and ax.max() <= 1
    values = set(torch.unique(ay).tolist())
    assert values <= {0, 1, 2, 3, 4, IGNORE_INDEX} and IGNORE_INDEX in values


def test_oversampling_favours_rare_classes():
    presence = np.zeros((100, 5), bool)
    presence[:, 1] = True
    presence[:4, 4] = True  # big rock in 4% of images
    w = oversampling_weights(presence, 0.5)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] / w[50] == pytest.approx(5.0)  # sqrt(1 / 0.04)
    assert np.allclose(oversampling_weights(presence, 0.0), 0.01)
    presence[7, 1:] = False  # an image of background only: drawn like one of common classes
    w = oversampling_weights(presence, 0.5)
    assert w[7] == pytest.approx(w[50], rel=0.01) and w[0] / w[7] == pytest.approx(5.0)


def test_affine_grid_equals_torchs():
    from trainer.augment import affine_grid, affine_theta

    theta = affine_theta(
        8,
        (64, 128),
        TrainConfig(max_rotation=20.0, max_scale=0.3, max_shift=0.2),
        torch.Generator().manual_seed(1),
    )
    expected = torch.nn.functional.affine_grid(theta, [8, 1, 64, 128], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, (64, 128)), expected, atol=1e-6, rtol=0)
