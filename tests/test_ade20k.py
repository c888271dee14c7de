from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from unet_seg.data.ade20k import ADE20K, ADE20K_CLASSES, reduce_zero_label
from unet_seg.data.transforms import IGNORE_INDEX, RandomResizeCropFlip, ResizeImage


def write_pair(root: Path, split: str, stem: str, raw_label: np.ndarray, rgb=None) -> None:
    """One ADEChallengeData2016 sample: images/<split>/<stem>.jpg and annotations/<split>/<stem>.png."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    h, w = raw_label.shape
    rgb = np.full((h, w, 3), 128, np.uint8) if rgb is None else rgb
    Image.fromarray(rgb).save(root / "images" / split / f"{stem}.jpg", quality=100)
    Image.fromarray(raw_label.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{stem}.png")


def test_there_are_150_distinct_classes_in_mmseg_order():
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert ADE20K_CLASSES[7] == "bed" and ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[44] == "chest of drawers"
    assert all(name == name.strip() for name in ADE20K_CLASSES)


def test_reduce_zero_label_sends_other_to_ignore_and_shifts_classes_down():
    raw = torch.tensor([[0, 1, 2], [150, 0, 75]], dtype=torch.uint8)
    expected = torch.tensor([[255, 0, 1], [149, 255, 74]])
    out = reduce_zero_label(raw)
    assert out.dtype == torch.int64 and torch.equal(out, expected)


@pytest.mark.parametrize("bad", [151, 255, -1])
def test_reduce_zero_label_refuses_values_outside_0_to_150(bad):
    with pytest.raises(ValueError, match=r"0\.\.150"):
        reduce_zero_label(torch.tensor([[0, bad]]))


def test_items_pair_images_with_annotations_of_the_same_name_in_sorted_order(tmp_path):
    for stem, value in [("ADE_train_00000002", 3), ("ADE_train_00000001", 1), ("ADE_train_00000010", 150)]:
        write_pair(tmp_path, "training", stem, np.full((8, 16), value))
    write_pair(tmp_path, "validation", "ADE_val_00000001", np.full((8, 16), 7))
    train, val = ADE20K(tmp_path, "training"), ADE20K(tmp_path, "validation")
    assert len(train) == 3 and len(val) == 1
    stems = [Path(train[i]["path"]).stem for i in range(3)]
    assert stems == ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000010"]
    assert [int(train[i]["label"][0, 0]) for i in range(3)] == [0, 2, 149]
    assert int(val[0]["label"][0, 0]) == 6


def test_item_holds_image_in_minus_one_one_and_reduced_label_of_the_same_size(tmp_path):
    raw = np.array([[0, 1, 2, 3], [150, 149, 0, 0], [5, 5, 5, 5]])
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[:, 2:] = 255
    write_pair(tmp_path, "validation", "a", raw, rgb)
    item = ADE20K(tmp_path, "validation")[0]
    image, label = item["image"], item["label"]
    assert image.shape == (3, 3, 4) and image.dtype == torch.float32
    assert label.shape == (3, 4) and label.dtype == torch.int64
    assert torch.equal(label, torch.tensor([[255, 0, 1, 2], [149, 148, 255, 255], [4, 4, 4, 4]]))
    assert image.min() >= -1 and image.max() <= 1
    assert image[:, :, 0].mean() < -0.8 and image[:, :, 3].mean() > 0.8  # black left, white right (JPEG blurs the edge)


def test_missing_root_is_refused_with_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016.*images/training/\*\.jpg"):
        ADE20K(tmp_path / "nowhere")


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training"):
        ADE20K(tmp_path, "train")


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no .jpg images"):
        ADE20K(tmp_path)


def test_images_and_annotations_that_do_not_pair_are_named(tmp_path):
    write_pair(tmp_path, "training", "both", np.zeros((8, 8)))
    write_pair(tmp_path, "training", "only_image", np.zeros((8, 8)))
    write_pair(tmp_path, "training", "only_label", np.zeros((8, 8)))
    (tmp_path / "annotations" / "training" / "only_image.png").unlink()
    (tmp_path / "images" / "training" / "only_label.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images lack an annotation \(e.g. \['only_image'\]\).*only_label"):
        ADE20K(tmp_path)


def test_colour_annotation_is_refused(tmp_path):
    write_pair(tmp_path, "training", "a", np.zeros((8, 8)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match="single-channel"):
        ADE20K(tmp_path)[0]


def test_annotation_of_another_size_is_refused(tmp_path):
    write_pair(tmp_path, "training", "a", np.zeros((8, 8)))
    Image.fromarray(np.zeros((8, 16), np.uint8), mode="L").save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(ValueError, match=r"\(8, 8\) but its annotation is \(8, 16\)"):
        ADE20K(tmp_path)[0]


def test_annotation_with_values_above_150_is_refused(tmp_path):
    write_pair(tmp_path, "training", "a", np.full((8, 8), 200))
    with pytest.raises(ValueError, match=r"a\.png: raw ADE20K labels must lie in 0\.\.150, got values in 200\.\.200"):
        ADE20K(tmp_path)[0]


# transforms


def coded_pair(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A label with its value written into every image channel, so any misalignment shows."""
    label = torch.randint(0, 150, (h, w), generator=torch.Generator().manual_seed(seed))
    label[0, 0] = IGNORE_INDEX
    return code(label).expand(3, h, w).clone(), label


def code(label: torch.Tensor) -> torch.Tensor:
    return torch.where(label == IGNORE_INDEX, 0.0, (label.float() + 1) / 151)


@given(
    h=st.integers(8, 40),
    w=st.integers(8, 40),
    crop=st.sampled_from([(8, 8), (16, 24), (48, 32)]),
    seed=st.integers(0, 99),
)
def test_crop_and_flip_keep_image_and_label_aligned_and_pad_with_ignore(h, w, crop, seed):
    """With the resize fixed at 1×, every output pixel is an input pixel: image and label must agree."""
    image, label = coded_pair(h, w, seed)
    transform = RandomResizeCropFlip(crop=crop, scale=(max(h, w), min(h, w)), ratio_range=(1.0, 1.0))
    out_image, out_label = transform(image, label, torch.Generator().manual_seed(seed))
    assert out_image.shape == (3, *crop) and out_label.shape == crop and out_label.dtype == torch.int64
    torch.testing.assert_close(out_image, code(out_label).expand(3, *crop), rtol=0, atol=1e-6)
    padded = max(crop[0] - h, 0) * crop[1] + max(crop[1] - w, 0) * min(crop[0], h)
    assert (out_label == IGNORE_INDEX).sum() >= padded


@settings(max_examples=10)
@given(h=st.integers(8, 64), w=st.integers(8, 64), seed=st.integers(0, 99))
def test_random_resize_gives_crop_size_and_only_input_labels(h, w, seed):
    image, label = coded_pair(h, w, seed)
    transform = RandomResizeCropFlip(crop=(32, 32), scale=(64, 32))
    out_image, out_label = transform(image, label, torch.Generator().manual_seed(seed))
    assert out_image.shape == (3, 32, 32) and out_label.shape == (32, 32)
    assert set(out_label.unique().tolist()) <= set(label.unique().tolist()) | {IGNORE_INDEX}
    assert out_image.min() >= -1 and out_image.max() <= 1


@pytest.mark.parametrize("ratio, side", [(1.0, 32), (0.8, 26), (1.2, 38)])
def test_without_keep_ratio_the_image_is_squashed_to_scale_times_the_ratio(ratio, side):
    # a 30 × 60 image, left half class 1, right half class 2: squashed to side × side whatever its aspect
    label = torch.ones(30, 60, dtype=torch.long)
    label[:, 30:] = 2
    image = code(label).expand(3, -1, -1)
    t = RandomResizeCropFlip(crop=(32, 32), scale=(32, 32), ratio_range=(ratio, ratio), keep_ratio=False)
    out_image, out_label = t(image, label, torch.Generator().manual_seed(0))
    assert out_label.shape == (32, 32)
    valid = out_label != IGNORE_INDEX
    assert valid.sum() == min(side, 32) ** 2  # padded below 32, cropped above
    if side <= 32:  # uncropped: the halves stay halves (kept aspect would give a 16 × 32 image)
        assert (out_label == 1).sum() == (out_label == 2).sum() == side * side // 2


def test_same_generator_seed_gives_the_same_augmentation():
    image, label = coded_pair(30, 50, 0)
    t = RandomResizeCropFlip(crop=(16, 16), scale=(64, 32))
    a = t(image, label, torch.Generator().manual_seed(3))
    b = t(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@given(h=st.integers(1, 300), w=st.integers(1, 300))
def test_resize_image_gives_multiples_of_8_within_scale_and_keeps_the_label(h, w):
    image, label = torch.zeros(3, h, w), torch.zeros(h, w, dtype=torch.long)
    out_image, out_label = ResizeImage(scale=(128, 64))(image, label, torch.Generator())
    oh, ow = out_image.shape[1:]
    assert oh % 8 == 0 and ow % 8 == 0 and oh >= 8 and ow >= 8
    assert max(oh, ow) <= 128 + 4 and min(oh, ow) <= 64 + 4
    assert out_label is label


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomResizeCropFlip(crop=(12, 16)),
        lambda: RandomResizeCropFlip(ratio_range=(2.0, 1.0)),
        lambda: ResizeImage(scale=(2048, 500)),
    ],
)
def test_sizes_not_multiples_of_8_and_bad_ratios_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_dataset_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        write_pair(tmp_path, "training", f"img{i}", rng.integers(0, 151, (40, 56)), rgb)
    transform = RandomResizeCropFlip(crop=(16, 16), scale=(64, 32))
    a, b = ADE20K(tmp_path, transform=transform, seed=1), ADE20K(tmp_path, transform=transform, seed=1)
    assert torch.equal(a[1]["image"], b[1]["image"]) and torch.equal(a[1]["label"], b[1]["label"])
    first = a[1]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], first)
    a.set_epoch(0)
    assert torch.equal(a[1]["image"], first)


def test_loader_batches_augmented_items(tmp_path):
    for i in range(3):
        write_pair(tmp_path, "training", f"img{i}", np.full((24 + i, 48), i + 1))
    loader = DataLoader(ADE20K(tmp_path, transform=RandomResizeCropFlip(crop=(16, 24), scale=(64, 32))), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 16, 24) and batch["label"].shape == (3, 16, 24)
    assert [p.endswith(f"img{i}.jpg") for i, p in enumerate(batch["path"])] == [True] * 3
    assert torch.equal(batch["label"][:, 0, 0], torch.tensor([0, 1, 2]))  # 1..3 reduced; no padding at 64/32 scale
