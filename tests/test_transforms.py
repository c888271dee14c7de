"""DAFormer's training transforms (mmseg RandomCrop with cat_max_ratio, PhotoMetricDistortion) and
rare-class sampling."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.data.transforms import (

    IGNORE_INDEX,
    Compose,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RareClassSampling,
    Resize,
    cached_class_counts,
    class_pixel_counts,
    hsv_to_rgb,
    rare_class_probabilities,
    rgb_to_hsv,
)

from .helpers import rand


def coordinate_image(h: int, w: int) -> torch.Tensor:
    """[3, h, w] in [-1, 1] whose pixels spell their own (row, column)."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None].expand(h, w)
    return torch.stack([rows / 1000, cols / 1000, torch.zeros(h, w)])


def share_ok(label: torch.Tensor, ratio: float) -> bool:
    counts = torch.bincount(label[label != IGNORE_INDEX].flatten())
    counts = counts[counts > 0]
    return len(counts) > 1 and (counts.max() / counts.sum()).item() < ratio


@given(h=st.integers(4, 40), w=st.integers(4, 40), crop=st.sampled_from([(8, 8), (16, 24), (32, 16)]),
       ratio=st.sampled_from([0.75, 1.0]), seed=st.integers(0, 2**31))  # fmt: skip
def test_random_crop_is_a_window_of_the_input_padded_to_the_crop(h, w, crop, ratio, seed):
    image = coordinate_image(h, w)
    label = torch.randint(0, 4, (h, w), generator=torch.Generator().manual_seed(seed))
    out, lab = RandomCrop(crop, ratio)(image, label, torch.Generator().manual_seed(seed))
    assert out.shape == (3, *crop) and lab.shape == crop and out.dtype == image.dtype and lab.dtype == label.dtype
    ch, cw = min(h, crop[0]), min(w, crop[1])
    top, left = round(out[0, 0, 0].item() * 1000), round(out[1, 0, 0].item() * 1000)
    assert torch.equal(out[:, :ch, :cw], image[:, top : top + ch, left : left + cw])
    assert torch.equal(lab[:ch, :cw], label[top : top + ch, left : left + cw])
    assert (out[:, ch:] == 0).all() and (out[:, :, cw:] == 0).all()
    assert (lab[ch:] == IGNORE_INDEX).all() and (lab[:, cw:] == IGNORE_INDEX).all()


@given(seed=st.integers(0, 2**31), column=st.integers(0, 56))
def test_cat_max_ratio_redraws_until_no_class_dominates(seed, column):
    """One narrow stripe of class 2 in a sea of class 1: only windows covering enough of the
    stripe pass; with ample retries the crop always passes, without the check it rarely does."""
    label = torch.ones(16, 64, dtype=torch.long)
    label[:, column : column + 8] = 2
    label[0] = IGNORE_INDEX  # ignored pixels are not counted
    image = coordinate_image(16, 64)
    _, lab = RandomCrop((16, 16), 0.75, retries=200)(image, label, torch.Generator().manual_seed(seed))
    assert share_ok(lab, 0.75)


def test_cat_max_ratio_check_changes_the_window_distribution():
    label = torch.ones(16, 256, dtype=torch.long)
    label[:, 100:108] = 2
    image = coordinate_image(16, 256)
    passed = {}
    for ratio in (0.75, 1.0):
        crops = [RandomCrop((16, 16), ratio)(image, label, torch.Generator().manual_seed(s))[1] for s in range(200)]
        passed[ratio] = np.mean([share_ok(c, 0.75) for c in crops])
    assert passed[1.0] < 0.1 and passed[0.75] > 2 * passed[1.0]  # ~2/241 per draw; 11 draws with the check


def test_random_crop_refuses_bad_settings():
    with pytest.raises(ValueError, match="multiple of 8"):
        RandomCrop((12, 16))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        RandomCrop((16, 16), 0.0)


@given(h=st.integers(2, 12), w=st.integers(2, 12), seed=st.integers(0, 2**31))
def test_hsv_round_trip_and_grey_has_no_saturation(h, w, seed):
    rgb = torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    hsv = rgb_to_hsv(rgb)
    assert ((hsv >= 0) & (hsv <= 1)).all()
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, rtol=0, atol=1e-12)
    grey = rgb[:1].expand(3, h, w)
    assert (rgb_to_hsv(grey)[1] == 0).all()


def test_hsv_of_primary_colours():
    rgb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]).T[:, :, None]  # [3, 3, 1]: red, green, blue
    torch.testing.assert_close(rgb_to_hsv(rgb)[0, :, 0], torch.tensor([0.0, 1 / 3, 2 / 3]))


@given(seed=st.integers(0, 2**31))
def test_photometric_distortion_stays_in_range_keeps_the_label_and_is_seeded(seed):
    g = torch.Generator().manual_seed(seed)
    image, label = torch.rand(3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 19, (8, 8), generator=g)
    pmd = PhotoMetricDistortion()
    out, lab = pmd(image, label, torch.Generator().manual_seed(seed))
    again, _ = pmd(image, label, torch.Generator().manual_seed(seed))
    assert out.shape == image.shape and out.dtype == image.dtype and torch.equal(out, again)
    assert out.min() >= -1 and out.max() <= 1 and lab is label


def test_photometric_distortion_without_ranges_is_the_identity():
    image = rand(3, 8, 8, seed=12) * 2 - 1
    for seed in range(10):
        out, _ = PhotoMetricDistortion(0.0, (1.0, 1.0), (1.0, 1.0), 0)(image, None, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, image, rtol=0, atol=1e-5)


def pmd_rounds(pmd, image, n=300):
    return [pmd(image, None, torch.Generator().manual_seed(seed))[0] for seed in range(n)]


def test_brightness_adds_one_offset_about_half_the_time():
    image = rand(3, 16, 16, seed=13) - 0.5  # far from the clipping range
    outs = pmd_rounds(PhotoMetricDistortion(32.0, (1.0, 1.0), (1.0, 1.0), 0), image)
    shifts = [(out - image) * 127.5 for out in outs]
    changed = [s for s in shifts if s.abs().max() > 1e-3]
    assert 0.38 < len(changed) / len(outs) < 0.62
    for s in changed:  # one offset for every pixel, within ±32 grey levels
        assert s.max() - s.min() < 1e-3 and s.abs().max() <= 32 + 1e-3


def test_zero_saturation_turns_grey_about_half_the_time():
    image = rand(3, 16, 16, seed=14) * 2 - 1
    outs = pmd_rounds(PhotoMetricDistortion(0.0, (1.0, 1.0), (0.0, 0.0), 0), image)
    grey = [bool(((out - out[:1]).abs().max() < 1e-5).item()) for out in outs]
    assert 0.38 < np.mean(grey) < 0.62


def test_hue_shifts_by_whole_opencv_units_and_keeps_saturation_and_value():
    image = rand(3, 16, 16, seed=15).to(torch.float64) * 1.6 - 0.8
    hsv = rgb_to_hsv((image + 1) / 2)
    shifted = 0
    for out in pmd_rounds(PhotoMetricDistortion(0.0, (1.0, 1.0), (1.0, 1.0), 18), image, 100):
        out_hsv = rgb_to_hsv((out + 1) / 2)
        torch.testing.assert_close(out_hsv[1:], hsv[1:], rtol=0, atol=1e-9)
        units = ((out_hsv[0] - hsv[0]) * 180 + 90) % 180 - 90  # in (-90, 90]
        k = units.round()
        torch.testing.assert_close(units, k, rtol=0, atol=1e-6)
        assert (k == k.flatten()[0]).all() and -18 <= k.flatten()[0] < 18
        shifted += bool(k.flatten()[0] != 0)
    assert 30 < shifted < 70


def test_compose_resize_crop_flip_photometric_is_seeded_and_shaped():
    image = rand(3, 105, 191, seed=16) * 2 - 1
    label = torch.randint(0, 19, (105, 191), generator=torch.Generator().manual_seed(17))
    pipeline = Compose((Resize((128, 72)), RandomCrop((64, 64)), RandomFlip(), PhotoMetricDistortion()))
    a = pipeline(image, label, torch.Generator().manual_seed(3))
    b = pipeline(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 64, 64) and a[1].shape == (64, 64)
    resized, lab = Resize((128, 72))(image, label, None)
    assert resized.shape[1:] == lab.shape == (70, 128)  # 191x105 fits 128x72 at 0.67: 128x70


# ---------------------------------------------------------------------------------------------
# Rare-class sampling


@given(counts=st.lists(st.lists(st.integers(0, 10**6), min_size=4, max_size=4), min_size=1, max_size=6),
       temperature=st.sampled_from([0.01, 0.1, 1.0]))  # fmt: skip
def test_rare_class_probabilities_follow_daformer(counts, temperature):
    counts = np.array(counts, np.int64)
    total = counts.sum(0)
    if total.sum() == 0:
        with pytest.raises(ValueError, match="no labelled pixels"):
            rare_class_probabilities(counts, temperature)
        return
    p = rare_class_probabilities(counts, temperature)
    assert p.shape == (4,) and abs(p.sum() - 1) < 1e-9 and (p[total == 0] == 0).all()
    f = total / total.sum()
    present = np.flatnonzero(total)
    expected = np.exp((1 - f[present]) / temperature - ((1 - f[present]) / temperature).max())
    np.testing.assert_allclose(p[present], expected / expected.sum(), rtol=1e-9)
    order = present[np.argsort(total[present])]  # rarer classes are never less likely
    assert (np.diff(p[order]) <= 1e-12).all()


def test_class_pixel_counts_ignore_255_and_out_of_range_ids():
    labels = [torch.tensor([[0, 0, 2], [255, 2, 7]]), torch.full((2, 2), 255)]
    np.testing.assert_array_equal(class_pixel_counts(labels, 3), [[2, 0, 2], [0, 0, 0]])


def test_class_counts_are_computed_once_and_recomputed_when_the_files_change(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6).reshape(2, 3)

    path = tmp_path / "stats.json"
    a = cached_class_counts(path, ["a.png", "b.png"], compute)
    b = cached_class_counts(path, ["a.png", "b.png"], compute)
    assert len(calls) == 1 and np.array_equal(a, b) and path.is_file()
    cached_class_counts(path, ["a.png", "c.png"], compute)
    assert len(calls) == 2


class ToyScenes(torch.utils.data.Dataset):
    """Image i: class 0 everywhere but a block of class i % 3 + 1 whose size grows with i."""

    def __init__(self, n=12):
        self.labels = []
        for i in range(n):
            y = torch.zeros(32, 32, dtype=torch.long)
            y[: 4 + i, : 4 + i] = i % 3 + 1
            self.labels.append(y)
        self.transform = RandomCrop((16, 16), 1.0)

    def __len__(self):
        return len(self.labels)

    def item(self, index, generator):
        image, label = self.transform(torch.zeros(3, 32, 32), self.labels[index], generator)
        return dict(image=image, label=label, index=index)


def test_rare_class_sampling_draws_classes_by_their_probability_and_crops_holding_them():
    data = ToyScenes()
    counts = class_pixel_counts(data.labels, 4)
    rcs = RareClassSampling(data, counts, temperature=1.0, min_pixels=20, min_crop_ratio=0.5)
    items = [rcs[i] for i in range(len(rcs))] + [rcs.set_epoch(e) or rcs[i] for e in range(1, 40) for i in range(12)]
    drawn = np.bincount([it["rare_class"] for it in items], minlength=4) / len(items)
    np.testing.assert_allclose(drawn, rcs.probs.numpy(), atol=0.05)
    for it in items:
        c = it["rare_class"]
        assert counts[it["index"], c] > 20  # an image holding more than min_pixels of c
    def held(sampler) -> float:  # share of crops holding more than min_pixels · ratio of the drawn class
        hits = []
        for e in range(40):
            sampler.set_epoch(e)
            hits += [(it["label"] == it["rare_class"]).sum().item() > 10 for it in map(sampler.__getitem__, range(12))]
        return float(np.mean(hits))

    once = RareClassSampling(data, counts, temperature=1.0, min_pixels=20, min_crop_ratio=0.5, retries=1)
    assert held(rcs) > held(once) + 0.1  # re-cropped (10 tries) until the crop holds it
    assert rcs[5]["rare_class"] == rcs[5]["rare_class"] and torch.equal(rcs[5]["label"], rcs[5]["label"])


def test_rare_class_sampling_refuses_mismatched_counts():
    with pytest.raises(ValueError, match="rows"):
        RareClassSampling(ToyScenes(4), np.zeros((3, 4), np.int64))


def test_short_edge_resize_draws_from_the_list_and_caps_the_long_side():
    from unet_seg.data.transforms import RandomShortEdgeResize, short_edges_for

    edges = short_edges_for(512)
    assert edges[:3] == (256, 307, 358) and edges[-1] == 1024 and len(edges) == 16
    resize = RandomShortEdgeResize(edges, 2048)
    image, label = coordinate_image(1052, 1914), torch.zeros(1052, 1914, dtype=torch.long)  # a GTA5 frame
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        out, lab = resize(image, label, g)
        assert out.shape[1:] == lab.shape and out.shape[1] in edges  # the short side is the height here
        assert abs(out.shape[2] / out.shape[1] - 1914 / 1052) < 0.01
        seen.add(out.shape[1])
    assert len(seen) > 8
    wide = RandomShortEdgeResize((1024,), 2048)(coordinate_image(100, 400), torch.zeros(100, 400, dtype=torch.long), g)[0]
    assert wide.shape[1:] == (512, 2048)  # 1024 short would make the long side 4096: capped


def test_rescale_halves_image_and_label():
    from unet_seg.data.transforms import Rescale

    label = torch.arange(4)[:, None].expand(4, 6).repeat_interleave(2, 0).repeat_interleave(2, 1)  # 8 x 12 blocks
    image, out = Rescale(0.5)(coordinate_image(8, 12), label, torch.Generator())
    assert image.shape == (3, 4, 6) and torch.equal(out, torch.arange(4)[:, None].expand(4, 6))


def test_release_resizes_bilinear_without_antialiasing_as_cv2():
    # mmcv's cv2 INTER_LINEAR at exactly 1/2 averages each 2 × 2 block (half-pixel centres, no
    # antialiasing; torch's antialiased bilinear would weigh 4 × 4 pixels 1/8, 3/8, 3/8, 1/8 per axis)
    from unet_seg.data.transforms import Resize, ResizeImage

    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blocks = image.reshape(3, 16, 2, 24, 2).mean((2, 4))
    label = torch.zeros(32, 48, dtype=torch.long)
    torch.testing.assert_close(Resize((24, 16))(image, label, torch.Generator())[0], blocks)  # training (DIFF's GTA5)
    torch.testing.assert_close(ResizeImage((24, 16))(image, label, torch.Generator())[0], blocks)  # evaluation


def test_mapillary_halving_equals_pil_bicubic_with_floored_sides():
    # the release halves Mapillary validation with PIL: im.resize((w // 2, h // 2), Image.BICUBIC)
    import numpy as np
    from PIL import Image

    from unet_seg.data.transforms import Rescale

    image = torch.rand(3, 13, 18, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8  # away from the clamp
    out, _ = Rescale(0.5)(image, torch.zeros(13, 18, dtype=torch.long), torch.Generator())
    pil = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((9, 6), Image.BICUBIC)) for c in image]
    assert out.shape == (3, 6, 9)
    torch.testing.assert_close(out, torch.from_numpy(np.stack(pil)), rtol=0, atol=1e-6)  # measured 1.2e-7


def test_pad_fills_bottom_and_right_with_the_colour_and_ignore():
    from unet_seg.data.transforms import IMAGENET_MEAN, Pad

    image, label = torch.rand(3, 5, 7) * 2 - 1, torch.ones(5, 7, dtype=torch.long)
    out, lab = Pad((8, 9), IMAGENET_MEAN)(image, label, torch.Generator())
    assert out.shape == (3, 8, 9) and lab.shape == (8, 9)
    assert torch.equal(out[:, :5, :7], image) and torch.equal(lab[:5, :7], label)
    fill = torch.tensor(IMAGENET_MEAN)[:, None]
    assert torch.equal(out[:, 5:].flatten(1), fill.expand(3, 27)) and torch.equal(out[:, :5, 7:].flatten(1), fill.expand(3, 10))
    assert (lab[5:] == 255).all() and (lab[:, 7:] == 255).all()
    # 0 after ImageNet normalisation, as the release pads
    from unet_seg.backbones import imagenet_normalise

    torch.testing.assert_close(imagenet_normalise(fill[None, :, :, None]), torch.zeros(1, 3, 1, 1), rtol=0, atol=1e-6)
