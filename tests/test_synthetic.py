import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from unet_seg.codecs import label_map_to_masks
from unet_seg.data.synthetic import (
    ALL_CLASSES,
    CLASS_NAMES,
    CLEAN_STYLE,
    FORMS,
    HAZY_STYLE,
    IGNORE_INDEX,
    NUM_CLASSES,
    NUM_FOLDS,
    TEXTURES,
    FewShotEpisodes,
    SemanticScenes,
    Style,
    fold_split,
    scene,
)

seeds = st.integers(0, 2**40)
indices = st.integers(0, 99)
folds = st.integers(0, NUM_FOLDS - 1)
styles = st.sampled_from([CLEAN_STYLE, HAZY_STYLE])
sizes = st.tuples(st.integers(4, 12), st.integers(4, 12)).map(lambda hw: (8 * hw[0], 8 * hw[1]))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def class_id(name):
    return CLASS_NAMES.index(name)


def assert_identical(a, b):
    assert len(a) == len(b)
    if isinstance(a, dict):  # dataset items
        assert a.keys() == b.keys()
        a, b = a.values(), b.values()
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


# ------------------------------------------------------------------ classes and folds


def test_class_names_are_every_texture_form_pair_once():
    assert CLASS_NAMES[0] == "background" and len(CLASS_NAMES) == NUM_CLASSES + 1 == 21
    assert sorted(CLASS_NAMES[1:]) == sorted(f"{t} {f}" for f in FORMS for t in TEXTURES)
    assert ALL_CLASSES == tuple(range(1, NUM_CLASSES + 1))


def test_fold_test_sets_are_disjoint_and_cover_all_classes():
    tests = [set(fold_split(f)[1]) for f in range(NUM_FOLDS)]
    assert set().union(*tests) == set(ALL_CLASSES)
    assert sum(len(t) for t in tests) == NUM_CLASSES
    for f in range(NUM_FOLDS):
        train, test = fold_split(f)
        assert set(train).isdisjoint(test) and set(train) | set(test) == set(ALL_CLASSES)
        assert test == tuple(c for c in ALL_CLASSES if (c - 1) % 4 == f)  # the COCO-20i rule


def test_each_held_out_class_pairs_a_form_and_texture_seen_in_training():
    for f in range(NUM_FOLDS):
        train, test = fold_split(f)
        test_forms = [CLASS_NAMES[c].split()[1] for c in test]
        assert sorted(test_forms) == sorted(FORMS)  # every form once per fold
        assert {CLASS_NAMES[c].split()[0] for c in test} == set(TEXTURES)
        seen_textures = {CLASS_NAMES[c].split()[0] for c in train}
        seen_forms = {CLASS_NAMES[c].split()[1] for c in train}
        for c in test:
            texture, form = CLASS_NAMES[c].split()
            assert texture in seen_textures and form in seen_forms


@pytest.mark.parametrize("fold", [-1, 4, 1.0, "0"])
def test_fold_split_rejects_folds_outside_0_to_3(fold):
    with pytest.raises(ValueError, match="fold"):
        fold_split(fold)


# ------------------------------------------------------------------ scenes


@given(seeds, sizes, st.lists(st.sampled_from(ALL_CLASSES), min_size=0, max_size=4), styles)
def test_scene_has_documented_shapes_dtypes_and_ranges(seed, size, class_ids, style):
    image, labels = scene(gen(seed), class_ids, size, style)
    assert image.shape == (3, *size) and image.dtype == torch.float32
    assert labels.shape == size and labels.dtype == torch.int64
    assert image.min() >= -1 and image.max() <= 1
    assert set(labels.unique().tolist()) <= {0, *class_ids}


@given(seeds, st.lists(st.sampled_from(ALL_CLASSES), min_size=1, max_size=4), styles)
def test_scene_is_a_function_of_the_generator_state(seed, class_ids, style):
    assert_identical(scene(gen(seed), class_ids, 64, style), scene(gen(seed), class_ids, 64, style))


@given(seeds, st.sampled_from(ALL_CLASSES), st.sampled_from(ALL_CLASSES), st.sampled_from(ALL_CLASSES))
def test_last_object_is_on_top_whatever_lies_below(seed, below_a, below_b, top):
    _, labels_a = scene(gen(seed), [below_a, top])
    _, labels_b = scene(gen(seed), [below_b, top])
    assert (labels_a == top).sum() > 0
    if top not in (below_a, below_b):
        assert torch.equal(labels_a == top, labels_b == top)


@given(seeds, st.sampled_from(FORMS), st.sampled_from(TEXTURES), st.sampled_from(TEXTURES))
def test_same_form_different_texture_differ_inside_the_mask_only(seed, form, texture_a, texture_b):
    a, b = class_id(f"{texture_a} {form}"), class_id(f"{texture_b} {form}")
    image_a, labels_a = scene(gen(seed), [a], style=CLEAN_STYLE)
    image_b, labels_b = scene(gen(seed), [b], style=CLEAN_STYLE)
    inside = labels_a == a
    assert torch.equal(inside, labels_b == b) and inside.sum() > 0
    outside = ~inside.expand(3, -1, -1)
    assert torch.equal(image_a[outside], image_b[outside])
    if texture_a != texture_b:  # the patterns differ by about 1.1 per channel on >= 1/4 of the object
        differs = (image_a - image_b).abs().mean(0)[inside] > 0.5
        assert differs.float().mean() > 0.1


@given(seeds, st.sampled_from(TEXTURES), st.sampled_from(FORMS), st.sampled_from(FORMS))
def test_same_texture_different_form_give_different_masks(seed, texture, form_a, form_b):
    a, b = class_id(f"{texture} {form_a}"), class_id(f"{texture} {form_b}")
    mask_a = scene(gen(seed), [a])[1] == a
    mask_b = scene(gen(seed), [b])[1] == b
    iou = (mask_a & mask_b).sum() / (mask_a | mask_b).sum()
    assert (iou < 0.9) == (form_a != form_b)


@given(seeds, st.lists(st.sampled_from(ALL_CLASSES), min_size=1, max_size=4))
def test_styles_keep_labels_and_change_colour_statistics(seed, class_ids):
    clean, labels_clean = scene(gen(seed), class_ids, style=CLEAN_STYLE)
    hazy, labels_hazy = scene(gen(seed), class_ids, style=HAZY_STYLE)
    assert torch.equal(labels_clean, labels_hazy)
    assert (clean - hazy).abs().mean() > 0.1


def test_styles_differ_in_mean_colour_and_contrast_over_a_dataset():
    clean = torch.stack([SemanticScenes(0, 32, style=CLEAN_STYLE)[i]["image"] for i in range(32)])
    hazy = torch.stack([SemanticScenes(0, 32, style=HAZY_STYLE)[i]["image"] for i in range(32)])
    assert (hazy.mean((0, 2, 3)) - clean.mean((0, 2, 3))).abs().min() > 0.1
    assert hazy.std() < 0.7 * clean.std()


def test_style_brightness_adds_a_constant_and_jitter_changes_the_image():
    plain, _ = scene(gen(0), [1, 2], style=Style())
    jittered, _ = scene(gen(0), [1, 2], style=Style(jitter=0.2))
    assert plain.min() >= -1 and not torch.equal(plain, jittered)
    shifted, _ = scene(gen(0), [1, 2], style=Style(brightness=0.1))
    inner = (plain > -0.85) & (plain < 0.85)
    assert torch.allclose(shifted[inner], plain[inner] + 0.1, atol=1e-6)


@given(seeds, st.integers(1, 2))
def test_ignore_border_only_relabels_pixels_next_to_another_label(seed, width):
    class_ids = [3, 7, 11]
    _, plain = scene(gen(seed), class_ids)
    _, bordered = scene(gen(seed), class_ids, ignore_border=width)
    kept = bordered != IGNORE_INDEX
    assert torch.equal(bordered[kept], plain[kept])
    edge = torch.zeros_like(plain, dtype=torch.bool)  # 4-neighbours with another label
    edge[1:] |= plain[1:] != plain[:-1]
    edge[:-1] |= plain[1:] != plain[:-1]
    edge[:, 1:] |= plain[:, 1:] != plain[:, :-1]
    edge[:, :-1] |= plain[:, 1:] != plain[:, :-1]
    assert (bordered[edge] == IGNORE_INDEX).all()
    window = 2 * width + 1
    lab = plain.float()[None, None]
    mixed = F.max_pool2d(lab, window, 1, width) != -F.max_pool2d(-lab, window, 1, width)
    assert torch.equal(~kept, mixed[0, 0])


# ------------------------------------------------------------------ semantic scenes


@given(seeds, indices, styles, st.integers(0, 1))
def test_semantic_items_are_a_function_of_seed_and_index(seed, index, style, border):
    a = SemanticScenes(seed, 100, style=style, ignore_border=border)
    b = SemanticScenes(seed, 100, style=style, ignore_border=border)
    assert_identical(b[index], a[index])
    assert_identical(a[index], a[index])


@given(seeds, indices)
def test_semantic_items_differ_across_indices_and_seeds(seed, index):
    ds = SemanticScenes(seed, 101)
    assert not torch.equal(ds[index]["image"], ds[index + 1]["image"])
    assert not torch.equal(ds[index]["image"], SemanticScenes(seed + 1, 101)[index]["image"])


@given(seeds, indices, folds, st.integers(0, 1))
def test_semantic_labels_use_only_the_given_classes(seed, index, fold, border):
    classes = fold_split(fold)[1]
    item = SemanticScenes(seed, 100, classes=classes, objects=(2, 3), ignore_border=border)[index]
    image, labels = item["image"], item["label"]
    present = set(labels.unique().tolist()) - {0, IGNORE_INDEX}
    assert 1 <= len(present) and present <= set(classes)
    assert image.shape == (3, 64, 64)


@given(seeds, indices, st.integers(0, 1))
def test_per_class_masks_are_binary_and_rebuild_the_label_map(seed, index, border):
    labels = SemanticScenes(seed, 100, ignore_border=border)[index]["label"]
    masks = label_map_to_masks(labels[None], NUM_CLASSES + 1)[0]  # [21, H, W]
    assert set(masks.unique().tolist()) <= {0, 1}
    rebuilt = (masks * torch.arange(NUM_CLASSES + 1).view(-1, 1, 1)).sum(0)
    valid = labels != IGNORE_INDEX
    assert torch.equal(rebuilt[valid], labels[valid])
    assert (masks.sum(0)[valid] == 1).all() and (masks.sum(0)[~valid] == 0).all()


# ------------------------------------------------------------------ few-shot episodes


@given(seeds, indices, folds, st.integers(1, 3), st.integers(0, 3), st.integers(0, 1), styles)
def test_every_episode_image_contains_its_class(seed, index, fold, shots, distractors, border, style):
    classes = fold_split(fold)[1]
    ep = FewShotEpisodes(seed, 100, classes, shots, distractors=distractors, style=style, ignore_border=border)[index]
    assert ep["class_id"].dtype == torch.int64 and int(ep["class_id"]) == classes[index % len(classes)]
    assert ep["query"].shape == (3, 64, 64) and ep["supports"].shape == (shots, 3, 64, 64)
    assert ep["query_mask"].shape == (64, 64) and ep["support_masks"].shape == (shots, 64, 64)
    assert ep["query_mask"].dtype == ep["support_masks"].dtype == torch.int64
    allowed = {0, 1, IGNORE_INDEX} if border else {0, 1}
    for mask in (ep["query_mask"], *ep["support_masks"]):
        assert set(mask.unique().tolist()) <= allowed
        assert (mask == 1).sum() > 0
    assert ep["query"].min() >= -1 and ep["query"].max() <= 1


@given(seeds, indices, folds)
def test_episodes_are_a_function_of_seed_and_index(seed, index, fold):
    classes = fold_split(fold)[0]
    a = FewShotEpisodes(seed, 100, classes, shots=2)[index]
    assert_identical(a, FewShotEpisodes(seed, 100, classes, shots=2)[index])
    assert not torch.equal(a["query"], FewShotEpisodes(seed + 1, 100, classes, shots=2)[index]["query"])


@settings(max_examples=8)
@given(seeds, indices, st.integers(1, 4))
def test_k_shot_episode_is_a_prefix_of_the_5_shot_episode(seed, index, k):
    classes = fold_split(2)[1]
    small = FewShotEpisodes(seed, 100, classes, shots=k)[index]
    big = FewShotEpisodes(seed, 100, classes, shots=5)[index]
    assert torch.equal(small["query"], big["query"]) and torch.equal(small["query_mask"], big["query_mask"])
    assert torch.equal(small["supports"], big["supports"][:k]) and torch.equal(small["support_masks"], big["support_masks"][:k])


@given(seeds, indices)
def test_query_and_supports_are_different_images(seed, index):
    ep = FewShotEpisodes(seed, 100, ALL_CLASSES, shots=2)[index]
    assert not torch.equal(ep["query"], ep["supports"][0]) and not torch.equal(ep["supports"][0], ep["supports"][1])


def test_distinct_scenes_hold_several_classes():
    classes = fold_split(0)[1]
    counts = [len(set(SemanticScenes(2, 40, classes=classes, objects=(2, 3), distinct=True)[i]["label"].unique().tolist()) - {0})
              for i in range(40)]
    repeats = [len(set(SemanticScenes(2, 40, classes=classes, objects=(2, 3))[i]["label"].unique().tolist()) - {0}) for i in range(40)]
    assert sum(c >= 2 for c in counts) >= 38  # only a fully covered object can hide a class
    assert sum(c == 1 for c in repeats) > sum(c == 1 for c in counts)
    with pytest.raises(ValueError, match="distinct"):
        SemanticScenes(0, 4, classes=(1, 2), objects=(2, 3), distinct=True)


def test_random_order_only_reorders_the_query_objects():
    classes = fold_split(0)[1]
    plain = FewShotEpisodes(3, 40, classes, shots=1)
    shuffled = FewShotEpisodes(3, 40, classes, shots=1, random_order=True)
    changed = 0
    for i in range(40):
        a, b = plain[i], shuffled[i]
        assert torch.equal(a["supports"], b["supports"]) and torch.equal(a["support_masks"], b["support_masks"])
        if not torch.equal(a["query"], b["query"]):  # the class painted first: it took the other object's geometry
            changed += 1
            assert not torch.equal(a["query_mask"], b["query_mask"])
    assert 10 <= changed <= 30  # two objects: the episode's class is painted first about half the time


def test_distractor_supports_show_the_querys_other_class():
    classes = fold_split(0)[1]
    right = FewShotEpisodes(5, 20, classes, shots=2, random_order=True)
    wrong = FewShotEpisodes(5, 20, classes, shots=2, random_order=True, supports_of="distractor")
    for i in range(20):
        a, b = right[i], wrong[i]
        assert torch.equal(a["query"], b["query"]) and torch.equal(a["query_mask"], b["query_mask"]) and a["class_id"] == b["class_id"]
        assert not torch.equal(a["supports"], b["supports"])
        assert all((m == 1).sum() > 0 for m in b["support_masks"])
    # the query's distractor (the control's support class) fills pixels of the query outside its mask:
    # with no distractors there is nothing to show
    with pytest.raises(ValueError, match="distractors >= 1"):
        FewShotEpisodes(0, 4, classes, distractors=0, supports_of="distractor")
    with pytest.raises(ValueError, match="supports_of"):
        FewShotEpisodes(0, 4, classes, supports_of="other")


def test_episode_classes_are_balanced_over_indices():
    classes = fold_split(1)[1]
    ds = FewShotEpisodes(0, 10, classes)
    assert [int(ds[i]["class_id"]) for i in range(10)] == list(classes) * 2


def test_episode_without_distractors_has_one_object_of_its_class():
    ds = FewShotEpisodes(5, 4, classes=(1,), distractors=0)
    for i in range(4):
        assert int(ds[i]["class_id"]) == 1 and (ds[i]["query_mask"] == 1).sum() > 0


def test_dataloader_stacks_episodes_into_batches():
    ds = FewShotEpisodes(0, 6, fold_split(0)[0], shots=2)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert isinstance(batch, dict)  # the items' type, each field stacked
    assert batch["query"].shape == (3, 3, 64, 64) and batch["supports"].shape == (3, 2, 3, 64, 64)
    assert batch["query_mask"].shape == (3, 64, 64) and batch["support_masks"].shape == (3, 2, 64, 64)
    assert batch["class_id"].tolist() == [int(ds[i]["class_id"]) for i in range(3)]
    assert torch.equal(batch["supports"][1], ds[1]["supports"])


# ------------------------------------------------------------------ bad input


@given(st.integers(1, 200).filter(lambda n: n % 8 != 0 or n < 32))
def test_sizes_not_multiple_of_8_or_below_32_raise(n):
    with pytest.raises(ValueError, match="size"):
        scene(gen(0), [1], n)
    with pytest.raises(ValueError, match="size"):
        SemanticScenes(0, 4, size=(64, n))
    with pytest.raises(ValueError, match="size"):
        FewShotEpisodes(0, 4, ALL_CLASSES, size=(n, 64))


@pytest.mark.parametrize(
    "make",
    [
        lambda: scene(gen(0), [0]),
        lambda: scene(gen(0), [NUM_CLASSES + 1]),
        lambda: scene(gen(0), [1], ignore_border=-1),
        lambda: SemanticScenes(-1, 4),
        lambda: SemanticScenes(0, 0),
        lambda: SemanticScenes(0, 4, classes=()),
        lambda: SemanticScenes(0, 4, objects=(3, 2)),
        lambda: SemanticScenes(0, 4, objects=(0, 2)),
        lambda: FewShotEpisodes(0, 4, ALL_CLASSES, shots=0),
        lambda: FewShotEpisodes(0, 4, ALL_CLASSES, distractors=-1),
        lambda: FewShotEpisodes(0, 4, (3,), distractors=1),
    ],
)
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_index_out_of_range_raises_index_error():
    with pytest.raises(IndexError):
        SemanticScenes(0, 4)[4]
    with pytest.raises(IndexError):
        FewShotEpisodes(0, 4, ALL_CLASSES)[-1]


def test_random_style_is_reproducible_and_mixes_colours_convexly():
    from unet_seg.data.synthetic import random_style

    a, b = random_style(torch.Generator().manual_seed(3)), random_style(torch.Generator().manual_seed(3))
    assert a == b
    for seed in range(20):
        style = random_style(torch.Generator().manual_seed(seed))
        rows = torch.tensor(style.colour_matrix)
        assert torch.allclose(rows.sum(1), torch.ones(3)) and (rows >= 0).all()
        assert 0.5 <= style.contrast <= 1.1 and -0.2 <= style.brightness <= 0.2
        assert 0 <= style.blur_sigma <= 1 and 0 <= style.noise_std <= 0.08


def test_describe_names_each_object_by_colour_class_and_position_in_reading_order():
    from unet_seg.data.synthetic import CLASS_NAMES, describe

    image = torch.zeros(3, 64, 64)  # grey background
    labels = torch.zeros(64, 64, dtype=torch.long)
    labels[40:60, 44:60], image[:, 40:60, 44:60] = 3, torch.tensor([0.8, -0.7, -0.7]).view(3, 1, 1)  # red, bottom right
    labels[2:14, 2:14], image[:, 2:14, 2:14] = 7, torch.tensor([-0.7, -0.6, 0.8]).view(3, 1, 1)  # blue, top left
    assert describe(image, labels) == f"blue {CLASS_NAMES[7]} at top left, red {CLASS_NAMES[3]} at bottom right on grey background"
    labels[labels == 0] = 255  # no background pixel, nothing said about it
    assert describe(image, labels).endswith(f"red {CLASS_NAMES[3]} at bottom right")


def test_colour_and_position_names():
    from unet_seg.data.synthetic import colour_name, position_name

    colours = ([0.9, 0.9, 0.9], [-0.9, -0.9, -0.9], [0.05, 0.0, -0.05], [0.8, -0.7, -0.7], [0.8, 0.8, -0.7], [-0.7, 0.7, -0.7], [-0.7, -0.7, 0.8])
    names = [colour_name(torch.tensor(c)) for c in colours]
    assert names == ["white", "black", "grey", "red", "orange", "green", "blue"]  # 45° sectors: pure yellow (60°) is "orange"
    assert [position_name(0.1, 0.9), position_name(0.5, 0.5), position_name(0.99, 0.0)] == ["top right", "centre", "bottom left"]


def test_captioned_scenes_are_a_pure_function_of_seed_and_index():
    from unet_seg.data.synthetic import CaptionedScenes, describe

    a, b = CaptionedScenes(3, 10, 64), CaptionedScenes(3, 10, 64)
    x, y = a[7], b[7]
    assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] == describe(x["image"], x["label"])
    assert a[6]["caption"] != x["caption"] or not torch.equal(a[6]["image"], x["image"])
    assert 1 <= len(set(x["label"].unique().tolist()) - {0}) <= 4
