import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from unet_seg.data.coco20i import (
    COCO20I_CLASSES,
    COCO20i,
    FOLD_RULES,
    class_pixel_index,
    fold_classes,
    train_classes,
)

# Fixture: per COCO split 6 images of 36 x 40. Class c owns the 4 x 4 block at rows 4·(c // 10),
# columns 4·(c % 10) and is painted there in image j iff (c + j) % 3 != 0, so every class is in
# 4 of the 6 images. Rows 32..35 are 255 (ignore) in even images, background in odd ones.
# Image j is one flat colour, so a loaded image tells which file it came from.
N_IMAGES, H, W, BLOCK = 6, 36, 40, 4
SIZE = 16


def class_map(j: int) -> np.ndarray:
    raw = np.zeros((H, W), np.uint8)
    for c in range(80):
        if (c + j) % 3:
            r, k = 4 * (c // 10), 4 * (c % 10)
            raw[r : r + BLOCK, k : k + BLOCK] = c + 1
    if j % 2 == 0:
        raw[32:] = 255
    return raw


def colour(j: int) -> tuple[int, int, int]:
    return (30 + 35 * j, 220 - 30 * j, 100)


def stem(coco_split: str, j: int) -> str:
    return f"COCO_{coco_split}_{j * 7 + 9:012d}"


def write_sample(root: Path, coco_split: str, name: str, raw: np.ndarray, rgb: tuple[int, int, int]) -> None:
    (root / coco_split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / coco_split).mkdir(parents=True, exist_ok=True)
    image = np.broadcast_to(np.array(rgb, np.uint8), (*raw.shape, 3))
    Image.fromarray(np.ascontiguousarray(image)).save(root / coco_split / f"{name}.jpg", quality=100)
    Image.fromarray(raw, mode="L").save(root / "annotations" / coco_split / f"{name}.png")


def write_fixture(root: Path) -> Path:
    """The HSNet COCO2014 layout, in miniature."""
    for coco_split in ("train2014", "val2014"):
        for j in range(N_IMAGES):
            write_sample(root, coco_split, stem(coco_split, j), class_map(j), colour(j))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("COCO2014"))


def image_number(name: str) -> int:
    return (int(name.rsplit("_", 1)[1]) - 9) // 7


# ---------------------------------------------------------------------------------------------
# Classes and folds


def test_there_are_80_distinct_classes_in_coco_category_order():
    assert len(COCO20I_CLASSES) == len(set(COCO20I_CLASSES)) == 80
    # 1-indexed values of a published class-map conversion table (`coco_cat2trainid`), minus 1
    known = {"person": 0, "bicycle": 1, "airplane": 4, "stop sign": 11, "kite": 33, "cup": 41, "toilet": 61}
    known |= {"tv": 62, "oven": 69, "teddy bear": 77, "hair drier": 78, "toothbrush": 79}
    assert {name: COCO20I_CLASSES.index(name) for name in known} == known


@pytest.mark.parametrize("rule", FOLD_RULES)
def test_folds_of_each_rule_are_4_disjoint_sets_of_20_covering_the_80_classes(rule):
    folds = [set(fold_classes(f, rule)) for f in range(4)]
    assert all(len(f) == 20 for f in folds)
    assert set().union(*folds) == set(range(80))
    assert sum(len(f) for f in folds) == 80


def test_interleaved_fold_f_tests_the_classes_congruent_to_f_mod_4():
    for f in range(4):
        assert fold_classes(f, "interleaved") == tuple(range(f, 80, 4))
    assert fold_classes(0)[:3] == (0, 4, 8) and fold_classes(3)[-1] == 79  # interleaved is the default


def test_consecutive_fold_f_tests_classes_20f_to_20f_plus_19():
    assert [fold_classes(f, "consecutive") for f in range(4)] == [tuple(range(20 * f, 20 * f + 20)) for f in range(4)]


@pytest.mark.parametrize("rule", FOLD_RULES)
@pytest.mark.parametrize("fold", range(4))
def test_train_classes_are_the_other_60_in_ascending_order(fold, rule):
    train = train_classes(fold, rule)
    assert len(train) == 60 and list(train) == sorted(train)
    assert set(train) == set(range(80)) - set(fold_classes(fold, rule))


@pytest.mark.parametrize("fold, rule", [(4, "interleaved"), (-1, "interleaved"), (1.0, "interleaved"), (0, "hsnet")])
def test_fold_classes_refuses_unknown_folds_and_rules(fold, rule):
    with pytest.raises(ValueError, match="fold must be|rule must be"):
        fold_classes(fold, rule)


# ---------------------------------------------------------------------------------------------
# Class index


def test_class_pixel_index_counts_each_class_in_each_map(root):
    index = class_pixel_index(root, "val2014")
    assert sorted(index) == sorted(stem("val2014", j) for j in range(N_IMAGES))
    for j in range(N_IMAGES):
        assert index[stem("val2014", j)] == {c: BLOCK * BLOCK for c in range(80) if (c + j) % 3}


def test_class_pixel_index_is_read_back_from_its_json_and_rebuilt_when_the_maps_change(tmp_path):
    write_fixture(tmp_path)
    first = class_pixel_index(tmp_path, "train2014")
    cache = tmp_path / "annotations" / "train2014_class_pixels.json"
    assert cache.is_file()
    stored = json.loads(cache.read_text())
    stored[stem("train2014", 0)] = {"5": 123}  # a marker only the cache can produce
    cache.write_text(json.dumps(stored))
    assert class_pixel_index(tmp_path, "train2014")[stem("train2014", 0)] == {5: 123}
    write_sample(tmp_path, "train2014", "COCO_train2014_000000999999", class_map(1), colour(1))
    rebuilt = class_pixel_index(tmp_path, "train2014")
    assert rebuilt[stem("train2014", 0)] == first[stem("train2014", 0)]
    assert len(rebuilt) == N_IMAGES + 1


# ---------------------------------------------------------------------------------------------
# Episodes


@given(
    index=st.integers(0, 999),
    fold=st.integers(0, 3),
    rule=st.sampled_from(FOLD_RULES),
    split=st.sampled_from(["train", "val"]),
    shots=st.integers(1, 3),
)
def test_episode_class_belongs_to_the_split_and_every_image_shows_it(root, index, fold, rule, split, shots):
    ep = COCO20i(root, fold, split, shots=shots, size=SIZE, episodes=1000, seed=3, fold_rule=rule)[index]
    c = int(ep["class_id"]) - 1  # the label; fold_classes number from 0
    if split == "val":
        assert c in fold_classes(fold, rule)
    else:
        assert c not in fold_classes(fold, rule) and c in train_classes(fold, rule)
    assert ep["query"].shape == (3, SIZE, SIZE) and ep["query"].dtype == torch.float32
    assert ep["supports"].shape == (shots, 3, SIZE, SIZE) and ep["supports"].dtype == torch.float32
    assert ep["query_mask"].shape == (SIZE, SIZE) and ep["query_mask"].dtype == torch.int64
    assert ep["support_masks"].shape == (shots, SIZE, SIZE) and ep["support_masks"].dtype == torch.int64
    assert ep["class_id"].dtype == torch.int64 and ep["class_id"].shape == ()
    for image in (ep["query"], ep["supports"]):
        assert image.min() >= -1 and image.max() <= 1
    for mask in (ep["query_mask"], ep["support_masks"]):
        assert set(mask.unique().tolist()) <= {0, 1, 255}
    assert (ep["query_mask"] == 1).any() and (ep["support_masks"] == 1).flatten(1).any(1).all()
    ids = [ep["query_id"], *ep["support_ids"]]
    assert len(set(ids)) == shots + 1  # supports differ from the query and from each other
    assert all((c + image_number(name)) % 3 for name in ids)  # the fixture's files that hold class c


@given(index=st.integers(0, 999), split=st.sampled_from(["train", "val"]))
def test_masks_are_the_nearest_resized_class_maps_of_the_episode_class_with_ignore_kept(root, index, split):
    ep = COCO20i(root, 2, split, shots=2, size=SIZE, episodes=1000)[index]
    c = int(ep["class_id"]) - 1
    for name, mask in zip([ep["query_id"], *ep["support_ids"]], [ep["query_mask"], *ep["support_masks"]]):
        raw = torch.from_numpy(class_map(image_number(name)).astype(np.int64))
        binary = torch.where(raw == 255, 255, (raw == c + 1).long())
        expected = F.interpolate(binary[None, None].float(), size=(SIZE, SIZE), mode="nearest")[0, 0].long()
        assert torch.equal(mask, expected)
        assert (mask == 255).any() == (image_number(name) % 2 == 0)


def test_images_are_the_files_named_by_the_ids(root):
    ep = COCO20i(root, 0, "val", shots=3, size=SIZE)[7]
    for name, image in zip([ep["query_id"], *ep["support_ids"]], [ep["query"], *ep["supports"]]):
        expected = torch.tensor(colour(image_number(name)), dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(image.mean((1, 2)), expected, atol=0.03)


def test_episodes_are_a_pure_function_of_seed_and_index(root):
    a, b = COCO20i(root, 1, "train", shots=2, size=SIZE, seed=5), COCO20i(root, 1, "train", shots=2, size=SIZE, seed=5)
    for i in (0, 3, len(a) - 1, 2):
        ea, eb = a[i], b[i]
        assert ea["query_id"] == eb["query_id"] and ea["support_ids"] == eb["support_ids"]
        assert all(torch.equal(ea[k], eb[k]) for k in ("query", "query_mask", "supports", "support_masks", "class_id"))


def draws(ds: COCO20i, n: int) -> list[tuple]:
    return [(int(e["class_id"]) - 1, e["query_id"], tuple(e["support_ids"])) for e in (ds[i] for i in range(n))]


def test_other_seeds_and_epochs_give_other_episodes_and_epoch_0_the_evaluation_ones(root):
    base = draws(COCO20i(root, 0, "val", size=SIZE, seed=0), 20)
    assert len(set(base)) > 10  # indices are not all the same episode
    assert draws(COCO20i(root, 0, "val", size=SIZE, seed=1), 20) != base
    ds = COCO20i(root, 0, "val", size=SIZE, seed=0)
    ds.set_epoch(1)
    assert draws(ds, 20) != base
    ds.set_epoch(0)
    assert draws(ds, 20) == base


def test_val_has_1000_episodes_and_train_one_per_listed_image_unless_told(root):
    assert len(COCO20i(root, 0, "val", size=SIZE)) == 1000
    assert len(COCO20i(root, 0, "train", size=SIZE)) == N_IMAGES
    assert len(COCO20i(root, 0, "val", size=SIZE, episodes=7)) == 7
    with pytest.raises(IndexError, match="out of range"):
        COCO20i(root, 0, "val", size=SIZE, episodes=7)[7]


def test_min_pixels_lists_an_image_under_a_class_from_that_many_pixels_on(root):
    assert len(COCO20i(root, 0, "val", size=SIZE, min_pixels=BLOCK * BLOCK)) == 1000
    with pytest.raises(ValueError, match=r"at least 2 images per class with >= 17 pixels.*'person': 0"):
        COCO20i(root, 0, "val", size=SIZE, min_pixels=BLOCK * BLOCK + 1)


def test_a_dataloader_batches_episodes(root):
    batch = next(iter(DataLoader(COCO20i(root, 3, "train", shots=2, size=SIZE), batch_size=3)))
    assert batch["query"].shape == (3, 3, SIZE, SIZE) and batch["supports"].shape == (3, 2, 3, SIZE, SIZE)
    assert batch["support_masks"].shape == (3, 2, SIZE, SIZE) and batch["class_id"].shape == (3,)
    assert len(batch["query_id"]) == 3


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_missing_root_is_refused_with_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory.*train2014,val2014.*annotations"):
        COCO20i(tmp_path / "nowhere", 0)


def test_a_root_without_class_maps_is_refused_with_the_expected_layout(tmp_path):
    (tmp_path / "train2014").mkdir()
    with pytest.raises(FileNotFoundError, match=r"annotations/train2014 is not a directory.*COCO-20i layout"):
        COCO20i(tmp_path, 0)
    (tmp_path / "annotations" / "train2014").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no \.png class maps"):
        COCO20i(tmp_path, 0)


def test_class_maps_without_images_are_refused(tmp_path):
    write_fixture(tmp_path)
    (tmp_path / "val2014" / f"{stem('val2014', 4)}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 class maps .* have no image.*{stem('val2014', 4)}"):
        COCO20i(tmp_path, 0, "val")


@pytest.mark.parametrize("bad", [81, 200])
def test_class_map_values_outside_0_to_80_and_255_are_refused_naming_the_file(tmp_path, bad):
    write_fixture(tmp_path)
    raw = class_map(1)
    raw[0, 0] = bad
    write_sample(tmp_path, "val2014", "COCO_val2014_000000000666", raw, colour(1))
    with pytest.raises(ValueError, match=rf"COCO_val2014_000000000666\.png: values must be .*\[{bad}\]"):
        COCO20i(tmp_path, 0, "val")


def test_a_bad_class_map_or_too_few_images_end_a_recipe_in_one_line_after_the_indexing_bar(tmp_path, capsys):
    from unet_seg.cli import run

    write_fixture(tmp_path)
    raw = class_map(1)
    raw[0, 0] = 90
    write_sample(tmp_path, "val2014", "COCO_val2014_000000000666", raw, colour(1))
    with pytest.raises(SystemExit) as e:
        run(lambda: COCO20i(tmp_path, 0, "val"), prog="recipe.py")
    assert e.value.code.startswith("recipe.py: error: ") and "values must be" in e.value.code and "\n" not in e.value.code
    assert capsys.readouterr().err.endswith("\n")  # the bar was closed before the error, not printed after it
    (tmp_path / "annotations" / "val2014" / "COCO_val2014_000000000666.png").unlink()
    (tmp_path / "val2014" / "COCO_val2014_000000000666.jpg").unlink()
    with pytest.raises(SystemExit) as e:
        run(lambda: COCO20i(tmp_path, 0, "val", shots=4, size=SIZE), prog="recipe.py")
    assert e.value.code.startswith("recipe.py: error: 4-shot episodes need at least 5 images per class")


def test_colour_class_maps_are_refused(tmp_path):
    write_fixture(tmp_path)
    path = tmp_path / "annotations" / "val2014" / f"{stem('val2014', 0)}.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="single-channel 8-bit"):
        COCO20i(tmp_path, 0, "val")


def test_an_image_and_class_map_of_different_sizes_are_refused(tmp_path):
    write_fixture(tmp_path)
    for j in range(N_IMAGES):  # every episode of fold 0 reads one of these
        image = np.zeros((H, W + 8, 3), np.uint8)
        Image.fromarray(image).save(tmp_path / "val2014" / f"{stem('val2014', j)}.jpg")
    with pytest.raises(ValueError, match=r"the image is \(36, 48\) but its class map is \(36, 40\)"):
        COCO20i(tmp_path, 0, "val", size=SIZE)[0]


def test_classes_with_too_few_images_for_the_shots_are_named(root):
    with pytest.raises(ValueError, match=r"4-shot episodes need at least 5 images per class.*'person': 4"):
        COCO20i(root, 0, "val", shots=4, size=SIZE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="test"), "split must be one of"),
        (dict(shots=0), "shots must be"),
        (dict(size=20), "multiple of 8"),
        (dict(size=0), "multiple of 8"),
        (dict(episodes=0), "episodes must be"),
        (dict(min_pixels=0), "min_pixels must be"),
        (dict(fold=4), "fold must be"),
        (dict(fold_rule="pfenet"), "rule must be one of"),
    ],
)
def test_bad_arguments_are_refused(root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        COCO20i(root, **{"fold": 0, **kwargs})
