"""Image/mask folders: both layouts, colour images, the AI4Mars mapping, resizing, bad folders."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from trainer.dataset import DatasetError
from trainer.formats import open_dataset, read_folder


def save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8), mode).save(path)


def make_pairs(root, n=3, shape=(8, 12), layout="subfolders", ext=".png"):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    masks = rng.integers(0, 5, (n, *shape), dtype=np.uint8)
    for i in range(n):
        if layout == "subfolders":
            save(root / "images" / f"im{i:02d}{ext}", images[i])
            save(root / "labels" / f"im{i:02d}.png", masks[i])
        else:
            save(root / f"im{i:02d}{ext}", images[i])
            save(root / f"im{i:02d}_mask.png", masks[i])
    return images, masks


@pytest.mark.parametrize("layout", ["subfolders", "flat"])
def test_layouts_match_by_stem(tmp_path, layout):
    images, masks = make_pairs(tmp_path, layout=layout)
    ds = read_folder(tmp_path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.masks, masks)
    assert len(ds.names) == 3 and ds.names[0].endswith("im00")


def test_open_dataset_dispatches_folders(tmp_path):
    make_pairs(tmp_path)
    assert len(open_dataset(tmp_path)) == 3


def test_rgb_images_become_grayscale(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> luma 76
    save(tmp_path / "images" / "a.jpg", rgb)
    save(tmp_path / "masks" / "a.png", np.ones((4, 6)))
    ds = read_folder(tmp_path)
    assert ds.images.shape == (1, 4, 6)
    assert abs(int(ds.images[0, 0, 0]) - 76) <= 3


def test_ai4mars_mapping(tmp_path):
    save(tmp_path / "images" / "NLA_1.JPG", np.full((4, 4), 100))
    save(tmp_path / "labels" / "NLA_1.png", np.array([[0, 1, 2, 3]] * 3 + [[255] * 4]))
    ds = read_folder(tmp_path, mask_mapping="ai4mars")
    np.testing.assert_array_equal(ds.masks[0], np.array([[1, 2, 3, 4]] * 3 + [[0] * 4]))


def test_identity_mapping_refuses_ai4mars_values(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4)))
    save(tmp_path / "labels" / "a.png", np.full((4, 4), 255))
    with pytest.raises(DatasetError, match=r"a\.png: mask values \[255\].*identity.*0\.\.4"):
        read_folder(tmp_path)


def test_colour_masks_are_refused_gray_rgb_masks_read(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4)))
    gray_rgb = np.repeat(np.array([[1, 2, 3, 4]] * 4, np.uint8)[..., None], 3, axis=2)
    save(tmp_path / "labels" / "a.png", gray_rgb)
    np.testing.assert_array_equal(read_folder(tmp_path).masks[0], gray_rgb[..., 0])
    colour = gray_rgb.copy()
    colour[0, 0] = (255, 0, 0)
    save(tmp_path / "labels" / "a.png", colour)
    with pytest.raises(DatasetError, match=r"a\.png: mask is a colour image"):
        read_folder(tmp_path)
    colour[0, 0] = (7, 7, 0)  # red and green alike, blue not: colour all the same
    save(tmp_path / "labels" / "a.png", colour)
    with pytest.raises(DatasetError, match=r"a\.png: mask is a colour image"):
        read_folder(tmp_path)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("0:5", "'5' is not a class"),
        ("0:1,#ff0000:4", "mixes colours and values"),
        ("70000:1", "'70000' is not a mask value 0..65535"),
        ("0:1,7", "'7' is not VALUE:CLASS"),
        ("#ff00:1", "'#ff00' is not a colour"),
    ],
)
def test_mask_mappings_that_cannot_be_meant_are_refused(spec, says):
    from trainer.mask_mapping import MaskMapping

    with pytest.raises(DatasetError, match=re.escape(says)):
        MaskMapping.parse(spec)


def test_resize_to_most_common_size_masks_nearest(tmp_path):
    for i, shape in enumerate([(8, 12), (8, 12), (13, 19)]):  # no whole factor: blends would show
        save(tmp_path / "images" / f"{i}.png", np.full(shape, 50 * i))
        mask = np.zeros(shape, np.uint8)
        mask[:, shape[1] // 2 :] = 3
        save(tmp_path / "masks" / f"{i}.png", mask)
    ds = read_folder(tmp_path)
    assert ds.images.shape == (3, 8, 12)
    assert set(np.unique(ds.masks[2]).tolist()) == {0, 3}  # nearest neighbour: no new values
    assert (ds.masks[2][:, :5] == 0).all() and (ds.masks[2][:, 7:] == 3).all()


def test_explicit_size(tmp_path):
    make_pairs(tmp_path)
    ds = read_folder(tmp_path, size=(4, 6))
    assert ds.images.shape == ds.masks.shape == (3, 4, 6)


def test_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        read_folder(tmp_path)


@pytest.mark.parametrize("layout", ["subfolders", "flat"])
def test_images_without_masks_are_the_unlabelled_pool(tmp_path, layout):
    images, masks = make_pairs(tmp_path, layout=layout)
    where = tmp_path / "images" if layout == "subfolders" else tmp_path
    save(where / "orphan.png", np.full((8, 12), 7))
    save(where / "zz_big.png", np.full((16, 24), 9))  # another size: resized like the rest
    ds = read_folder(tmp_path)
    np.testing.assert_array_equal(ds.masks, masks)
    assert ds.test_images.shape == (2, 8, 12) and ds.test_names[0].endswith("orphan")
    assert (ds.test_images[0] == 7).all() and (ds.test_images[1] == 9).all()


def test_folder_of_images_only_is_all_pool(tmp_path):
    for i in range(3):
        save(tmp_path / f"frame{i}.png", np.full((8, 12), i))
    ds = read_folder(tmp_path)
    assert len(ds) == 0 and ds.images.shape == (0, 8, 12) and len(ds.test_images) == 3


def test_masks_that_match_no_image(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4)))
    save(tmp_path / "masks" / "b.png", np.zeros((4, 4)))
    with pytest.raises(DatasetError, match="none of the 1 masks"):
        read_folder(tmp_path)


def test_unreadable_image(tmp_path):
    make_pairs(tmp_path)
    (tmp_path / "images" / "im01.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"im01\.png: unreadable image"):
        read_folder(tmp_path)


def test_mask_size_mismatch(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4)))
    save(tmp_path / "masks" / "a.png", np.zeros((5, 4)))
    with pytest.raises(DatasetError, match="expected the same size"):
        read_folder(tmp_path)


def test_unknown_mapping(tmp_path):
    make_pairs(tmp_path)
    with pytest.raises(DatasetError, match="valid: identity, ai4mars"):
        read_folder(tmp_path, mask_mapping="cityscapes")


def test_originals_untouched(tmp_path):
    make_pairs(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    read_folder(tmp_path, size=(4, 6))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png")} == before


def test_value_pairs_and_class_names(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((2, 3)))
    save(tmp_path / "labels" / "a.png", np.array([[0, 255, 0], [7, 7, 255]]))
    ds = read_folder(tmp_path, mask_mapping="0:1, 255:big rock, 7:Sand")
    np.testing.assert_array_equal(ds.masks[0], [[1, 4, 1], [3, 3, 4]])
    with pytest.raises(DatasetError, match=r"a\.png: mask values \[7\].*'0:1,255:4'.*lists 0, 255"):
        read_folder(tmp_path, mask_mapping="0:1,255:4")
    with pytest.raises(DatasetError, match="'lava' is not a class"):
        read_folder(tmp_path, mask_mapping="0:lava")


def test_colour_masks_through_a_colour_mapping(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((2, 3)))
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)
    save(tmp_path / "labels" / "a.png", rgb)
    ds = read_folder(tmp_path, mask_mapping="#000000:1,#FF0000:4")
    np.testing.assert_array_equal(ds.masks[0], [[1, 4, 1], [1, 1, 1]])
    rgb[1, 2] = (0, 255, 0)
    save(tmp_path / "labels" / "a.png", rgb)
    with pytest.raises(DatasetError, match=r"a\.png: mask colours #00ff00 are not in the mapping"):
        read_folder(tmp_path, mask_mapping="#000000:1,#ff0000:4")
    with pytest.raises(DatasetError, match="mask is a colour image.*--mask-mapping"):
        read_folder(tmp_path)


def test_toml_mapping(tmp_path):
    save(tmp_path / "data" / "images" / "a.png", np.zeros((2, 2)))
    save(tmp_path / "data" / "labels" / "a.png", np.array([[0, 9], [9, 0]]))
    table = tmp_path / "classes.toml"
    table.write_text('[mask_mapping]\n"0" = "soil"\n"9" = 2\n')
    ds = read_folder(tmp_path / "data", mask_mapping=str(table))
    np.testing.assert_array_equal(ds.masks[0], [[1, 2], [2, 1]])
    table.write_text("not = [toml")
    with pytest.raises(DatasetError, match=r"classes\.toml: not a readable TOML file"):
        read_folder(tmp_path / "data", mask_mapping=str(table))


def test_ai4mars_layout_with_rover_and_range_masks(tmp_path):
    """AI4Mars: images/edr, labels/train and labels/test/<agreement>/..._merged.png,
    images/mxy (rover) and images/rng-30m (beyond 30 m) mark pixels to ignore."""
    msl = tmp_path / "msl"
    for name in ("NLB_1_EDR_F1", "NLB_2_EDR_F1", "NLB_3_EDR_F1"):
        save(msl / "images" / "edr" / f"{name}.JPG", np.full((4, 4), 100))
    save(msl / "labels" / "train" / "NLB_1_EDR_F1.png", np.full((4, 4), 2))
    save(
        msl / "labels" / "test" / "masked-gold-min3-100agree" / "NLB_2_EDR_F1_merged.png", np.full((4, 4), 0)
    )
    rover = np.zeros((4, 4, 3), np.uint8)
    rover[3, :, 0] = 255  # a colour file: any channel set marks the pixel
    far = np.zeros((4, 4))
    far[0] = 1
    save(msl / "images" / "mxy" / "NLB_1_MXY_F1.png", rover)
    save(msl / "images" / "rng-30m" / "NLB_1_RNG_F1.png", far)
    ds = read_folder(tmp_path, mask_mapping="ai4mars")
    assert [n.split("/")[-1] for n in ds.names] == ["NLB_1_EDR_F1", "NLB_2_EDR_F1"]
    assert [n.split("/")[-1] for n in ds.test_names] == ["NLB_3_EDR_F1"]
    np.testing.assert_array_equal(ds.masks[0], [[0] * 4, [3] * 4, [3] * 4, [0] * 4])
    assert (ds.masks[1] == 1).all()
    save(msl / "images" / "mxy" / "NLB_1_MXY_F1.png", np.zeros((5, 4)))
    with pytest.raises(DatasetError, match=r"NLB_1_MXY_F1\.png: rover/range mask is 5x4"):
        read_folder(tmp_path, mask_mapping="ai4mars")


def test_sixteen_bit_frames_are_stretched(tmp_path):
    frame = np.array([[1000, 1000], [3000, 5000]], np.uint16)
    Image.fromarray(frame).save(tmp_path / "f.png")
    ds = read_folder(tmp_path)
    np.testing.assert_array_equal(ds.test_images[0], [[0, 0], [128, 255]])


def test_images_become_8_bit_gray_as_pil_reads_them():
    """Colour becomes luma exactly as PIL's convert("L") (which is what people compare
    with); 16-bit and float images are stretched onto 0..255; a boolean image is 0/255;
    a constant one is all 0."""
    from trainer.images import to_gray_u8

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_gray_u8(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(to_gray_u8(rgba), to_gray_u8(rgb))
    deep = np.array([[1000, 2000], [3000, 1000]], np.uint16)
    np.testing.assert_array_equal(to_gray_u8(deep), [[0, 128], [255, 0]])
    np.testing.assert_array_equal(to_gray_u8(np.array([[True, False]])), [[255, 0]])
    np.testing.assert_array_equal(to_gray_u8(np.full((2, 2), 0.5)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="grayscale or an RGB"):
        to_gray_u8(np.zeros((2, 2, 2)))
