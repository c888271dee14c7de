from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from unet_seg.data.transforms import RandomResizeCropFlip, ResizeImage
from unet_seg.data.driving import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_PALETTE,
    LAYOUTS,
    MAPILLARY_V12_IDS,
    TRAIN_IDS,
    DrivingScenes,
    find_pairs,
    label_lookup,
)

H, W = 12, 20


def save_rgb(path: Path, h: int = H, w: int = W, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def save_ids(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    """An id map as a grey PNG, or as a palette PNG whose colours differ from the ids (GTA5, Mapillary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette([(7 * i + 50) % 256 for i in range(768)])
    img.save(path)


def id_row(values, h: int = H, w: int = W) -> np.ndarray:
    """The ids in the first row's first columns, the rest 0."""
    ids = np.zeros((h, w), np.uint8)
    ids[0, : len(values)] = values
    return ids


# Raw ids -> expected train ids, written by hand from the tables' sources.
CITYSCAPES_RAW = [0, 1, 7, 8, 9, 11, 17, 18, 19, 20, 24, 26, 29, 31, 33, 34]
CITYSCAPES_EXPECTED = [255, 255, 0, 1, 255, 2, 5, 255, 6, 7, 11, 13, 255, 16, 18, 255]
MAPILLARY_RAW = [13, 24, 15, 2, 11, 46, 49, 50, 44, 47, 20, 21, 58, 55, 61, 0, 16, 35, 63, 65]
MAPILLARY_EXPECTED = [0, 0, 1, 1, 1, 7, 7, 7, 5, 5, 12, 12, 16, 13, 14, 255, 255, 255, 255, 255]
BDD_RAW = [0, 5, 18, 255, 19, 254]
BDD_EXPECTED = [0, 5, 18, 255, 255, 255]


def write_gta5(root: Path, stems=("00002", "00001")) -> None:
    for stem in stems:
        save_rgb(root / "images" / f"{stem}.png")
        save_ids(root / "labels" / f"{stem}.png", id_row(CITYSCAPES_RAW), palette=True)
        save_ids(root / "labels" / f"{stem}_labelTrainIds.png", np.full((H, W), 3))  # mmseg's conversion output


def write_cityscapes(root: Path, split: str = "val") -> None:
    for city, frame in [("lindau", "000001_000019"), ("frankfurt", "000000_000294")]:
        stem = f"{city}_{frame}"
        save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        save_ids(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", id_row(CITYSCAPES_RAW))
        save_ids(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", np.full((H, W), 26))
        save_rgb(root / "gtFine" / split / city / f"{stem}_gtFine_color.png")


def write_bdd(root: Path, split: str = "val") -> None:
    for stem in ["b1c9c847-3bda4659", "7d2f7975-e0c1c5a7"]:
        path = root / "images" / "10k" / split / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path, quality=100)
        save_ids(root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png", id_row(BDD_RAW))


def write_mapillary(root: Path, split_dir: str = "validation") -> None:
    for stem in ["zzR_-Tc0x1CRAi7Mz9b1tA", "-0ryHtKQ4o8OqqDfFqbOxQ"]:
        path = root / split_dir / "images" / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path, quality=100)
        save_ids(root / split_dir / "v1.2" / "labels" / f"{stem}.png", id_row(MAPILLARY_RAW), palette=True)


def write_acdc(root: Path, split: str = "val") -> None:
    for condition, seq in [("night", "GOPR0351"), ("fog", "GOPR0475")]:
        for s in (split, "train" if split == "val" else "val"):  # the other split must not be read
            stem = f"{seq}_frame_00004{1 if s == split else 2}"
            save_rgb(root / "rgb_anon" / condition / s / seq / f"{stem}_rgb_anon.png")
            save_ids(root / "gt" / condition / s / seq / f"{stem}_gt_labelIds.png", id_row(CITYSCAPES_RAW))
            save_ids(root / "gt" / condition / s / seq / f"{stem}_gt_labelTrainIds.png", np.full((H, W), 3))


def write_darkzurich(root: Path) -> None:
    for stem in ["GOPR0356_frame_000321", "GOPR0356_frame_000330"]:
        save_rgb(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png")
        save_ids(root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelIds.png", id_row(CITYSCAPES_RAW))


def test_cityscapes_classes_are_the_19_train_ids_in_order_with_their_colours():
    assert len(CITYSCAPES_CLASSES) == len(set(CITYSCAPES_CLASSES)) == 19
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[10] == "sky" and CITYSCAPES_CLASSES[18] == "bicycle"
    assert CITYSCAPES_CLASSES[6:8] == ("traffic light", "traffic sign") and CITYSCAPES_CLASSES[16] == "train"
    assert len(CITYSCAPES_PALETTE) == 19
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in CITYSCAPES_PALETTE)
    assert CITYSCAPES_PALETTE[0] == (128, 64, 128) and CITYSCAPES_PALETTE[13] == (0, 0, 142)
    assert len(set(CITYSCAPES_PALETTE)) == 19


def test_cityscapes_label_ids_map_the_19_classic_ids_to_0_to_18_and_the_rest_to_ignore():
    lookup = label_lookup(CITYSCAPES_LABEL_IDS)
    mapped = {i: int(lookup[i]) for i in range(256) if lookup[i] != 255}
    assert mapped == dict(zip([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], range(19)))
    assert len(CITYSCAPES_LABEL_IDS) == 34


def test_mapillary_table_has_66_v12_ids_and_reaches_every_cityscapes_class():
    lookup = label_lookup(MAPILLARY_V12_IDS)
    assert len(MAPILLARY_V12_IDS) == 66 and MAPILLARY_V12_IDS[65] == ("Unlabeled", None)
    assert set(lookup[:66].tolist()) == set(range(19)) | {255}
    assert (lookup[66:] == 255).all()
    assert sum(lookup[:66] != 255) == 34


def test_train_id_table_is_the_identity_on_0_to_18():
    lookup = label_lookup(TRAIN_IDS)
    assert lookup[:19].tolist() == list(range(19)) and (lookup[19:] == 255).all()


@given(arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6))), st.sampled_from(sorted(LAYOUTS)))
def test_label_lookup_sends_every_raw_id_to_a_train_id_or_ignore(raw, name):
    lookup = label_lookup(LAYOUTS[name].ids)
    out = lookup[raw]
    assert out.shape == raw.shape
    assert set(out.ravel().tolist()) <= set(range(19)) | {255}


@pytest.mark.parametrize(
    "name, split, write, expected",
    [
        ("gta5", "train", write_gta5, CITYSCAPES_EXPECTED),
        ("cityscapes", "val", write_cityscapes, CITYSCAPES_EXPECTED),
        ("bdd100k", "val", write_bdd, BDD_EXPECTED),
        ("mapillary", "val", write_mapillary, MAPILLARY_EXPECTED),
        ("acdc", "val", write_acdc, CITYSCAPES_EXPECTED),
        ("acdc", "train", lambda root: write_acdc(root, "train"), CITYSCAPES_EXPECTED),
        ("darkzurich", "val", write_darkzurich, CITYSCAPES_EXPECTED),
    ],
)
def test_each_layout_reads_images_in_minus_one_one_and_labels_as_train_ids(tmp_path, name, split, write, expected):
    write(tmp_path)
    ds = DrivingScenes(name, tmp_path, split)
    assert len(ds) == 2
    for item in (ds[0], ds[1]):
        image, label = item["image"], item["label"]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert label.shape == (H, W) and label.dtype == torch.int64
        assert image.min() >= -1 and image.max() <= 1 and abs(image.mean().item() - (128 / 127.5 - 1)) < 0.02
        assert label[0, : len(expected)].tolist() == expected
        assert Path(item["path"]).is_file()


def test_pairs_are_sorted_and_swap_suffixes_within_the_same_subfolder(tmp_path):
    write_cityscapes(tmp_path)
    pairs = find_pairs("cityscapes", tmp_path, "val")
    assert [image.name for image, _ in pairs] == [
        "frankfurt_000000_000294_leftImg8bit.png",
        "lindau_000001_000019_leftImg8bit.png",
    ]
    assert pairs[0][1] == tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    write_gta5(tmp_path / "gta")
    pairs = find_pairs("gta5", tmp_path / "gta", "train")
    assert [(i.name, lab.name) for i, lab in pairs] == [("00001.png", "00001.png"), ("00002.png", "00002.png")]


def test_mapillary_splits_read_training_and_validation_folders(tmp_path):
    write_mapillary(tmp_path, "training")
    pairs = find_pairs("mapillary", tmp_path, "train")
    assert pairs[0] == (
        tmp_path / "training/images/-0ryHtKQ4o8OqqDfFqbOxQ.jpg",
        tmp_path / "training/v1.2/labels/-0ryHtKQ4o8OqqDfFqbOxQ.png",
    )
    with pytest.raises(FileNotFoundError, match="validation/images"):
        find_pairs("mapillary", tmp_path, "val")


def test_gta5_label_of_another_size_is_resized_to_its_image_with_nearest(tmp_path):
    save_rgb(tmp_path / "images" / "00001.png", 8, 16)
    save_ids(tmp_path / "labels" / "00001.png", np.kron(np.array([[7, 26]]), np.ones((4, 8))), palette=True)
    item = DrivingScenes("gta5", tmp_path, "train")[0]
    assert item["image"].shape == (3, 8, 16) and item["label"].shape == (8, 16)
    assert (item["label"][:, :8] == 0).all() and (item["label"][:, 8:] == 13).all()


def test_other_datasets_refuse_a_label_of_another_size(tmp_path):
    write_cityscapes(tmp_path)
    path = tmp_path / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png"
    save_ids(path, np.zeros((H + 1, W), np.uint8))
    ds = DrivingScenes("cityscapes", tmp_path, "val")
    with pytest.raises(ValueError, match="lindau_000001_000019_leftImg8bit.png is .* but its label is"):
        ds[1]


def test_colour_label_files_are_refused(tmp_path):
    write_bdd(tmp_path)
    save_rgb(tmp_path / "labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png")
    with pytest.raises(ValueError, match="single-channel"):
        DrivingScenes("bdd100k", tmp_path, "val")[0]


def test_training_transform_is_fixed_by_seed_epoch_and_index(tmp_path):
    for stem in ("00001", "00002"):
        save_rgb(tmp_path / "images" / f"{stem}.png", 32, 48)
        ids = np.random.default_rng(int(stem)).integers(0, 34, (32, 48))
        save_ids(tmp_path / "labels" / f"{stem}.png", ids, palette=True)
    transform = RandomResizeCropFlip(crop=(16, 16), scale=(96, 64), ratio_range=(0.5, 2.0))
    a = DrivingScenes("gta5", tmp_path, "train", transform, seed=3)
    b = DrivingScenes("gta5", tmp_path, "train", transform, seed=3)
    first = a[1]
    assert first["image"].shape == (3, 16, 16) and first["label"].shape == (16, 16)
    assert torch.equal(first["label"], b[1]["label"]) and torch.equal(first["image"], b[1]["image"])
    labels_over_epochs = []
    for epoch in range(4):
        a.set_epoch(epoch)
        labels_over_epochs.append(a[1]["label"])
    assert any(not torch.equal(labels_over_epochs[0], other) for other in labels_over_epochs[1:])


def test_class_counts_count_train_ids_per_file_and_are_cached_next_to_the_data(tmp_path, monkeypatch):
    write_gta5(tmp_path)
    ds = DrivingScenes("gta5", tmp_path, "train")
    counts = ds.class_counts()
    labels = [ds[i]["label"] for i in range(len(ds))]
    for row, label in zip(counts, labels):
        assert row.tolist() == np.bincount(label[label != 255].numpy(), minlength=19).tolist()
    assert counts.shape == (2, 19) and (tmp_path / "class_counts_train.json").is_file()
    import unet_seg.data.driving as driving

    monkeypatch.setattr(driving, "read_label", lambda *a: (_ for _ in ()).throw(AssertionError("not cached")))
    assert np.array_equal(DrivingScenes("gta5", tmp_path, "train").class_counts(), counts)


def test_evaluation_resize_gives_image_sides_divisible_by_8_and_keeps_the_label(tmp_path):
    write_cityscapes(tmp_path)
    item = DrivingScenes("cityscapes", tmp_path, "val", ResizeImage(scale=(64, 32)))[0]
    assert item["image"].shape == (3, 32, 56) and item["label"].shape == (H, W)
    assert all(side % 8 == 0 for layout in LAYOUTS.values() for side in layout.scale)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_bad_root_is_refused_with_the_expected_layout(tmp_path, name):
    layout = LAYOUTS[name]
    split = next(iter(layout.images))
    with pytest.raises(FileNotFoundError, match=f"expected the {name} layout: .*{layout.images[split]}"):
        DrivingScenes(name, tmp_path / "nowhere", split)


def test_images_without_labels_are_refused_naming_them(tmp_path):
    write_bdd(tmp_path)
    (tmp_path / "labels/sem_seg/masks/val/b1c9c847-3bda4659.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 bdd100k val images lack a label.*b1c9c847-3bda4659\.png"):
        find_pairs("bdd100k", tmp_path, "val")


def test_empty_image_folder_and_unknown_names_or_splits_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.png images"):
        find_pairs("gta5", tmp_path, "train")
    with pytest.raises(ValueError, match="dataset must be one of"):
        find_pairs("synthia", tmp_path, "train")
    with pytest.raises(ValueError, match=r"gta5 has splits \('train',\)"):
        find_pairs("gta5", tmp_path, "val")
