"""Each geometric transform of `unet_seg.data.transforms` on its own keeps image and label aligned.

The image spells its own coordinates (channel 0 the row, channel 1 the column, channel 2 a constant
that padding replaces) and the label gives every pixel its own id, row · W + column + 256 (no id is
the ignore index). After a transform, a label pixel names the source pixel it came from and the
image pixel at the same place names the source point it was sampled at: a crop, flip or pad must
give the same pixel; a resize (bilinear image, nearest label at pixel centres) must give points
within half a source pixel of each other. A label cropped at another offset, flipped alone, padded
on the other side or resized with corner-aligned nearest sampling breaks that on non-square inputs.
"""

import pytest
import torch

from unet_seg.data.transforms import (
    IGNORE_INDEX, IMAGENET_MEAN, Pad, RandomCrop, RandomFlip, RandomResizeCropFlip, RandomShortEdgeResize, Rescale,
    Resize, ResizeImage,
)  # fmt: skip

SIZES = [(37, 53), (61, 23)]  # (H, W): non-square, odd, both orientations
CONSTANT = 0.5  # channel 2 of every source pixel


def coordinate_pair(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image [3, h, w] in [-1, 1]: (row / 128 − 1, column / 128 − 1, 0.5); label [h, w] = row·w + column + 256."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None].expand(h, w)
    image = torch.stack([rows / 128 - 1, cols / 128 - 1, torch.full((h, w), CONSTANT)])
    label = torch.arange(h * w).view(h, w) + 256
    return image, label


def decode(image: torch.Tensor, label: torch.Tensor, w: int):
    """-> (image row, image column, label row, label column, mask of labelled pixels)."""
    labelled = label != IGNORE_INDEX
    source = (label - 256).clamp(min=0)
    return (image[0] + 1) * 128, (image[1] + 1) * 128, (source // w).float(), (source % w).float(), labelled


def assert_same_pixels(image, label, w, fill=(0.0, 0.0, 0.0)):
    """Crops, flips, pads: every labelled pixel is the image's pixel; ignore exactly where padded."""
    y, x, ly, lx, labelled = decode(image, label, w)
    assert labelled.any()
    torch.testing.assert_close(y[labelled], ly[labelled], rtol=0, atol=1e-3)
    torch.testing.assert_close(x[labelled], lx[labelled], rtol=0, atol=1e-3)
    padded = ~labelled
    torch.testing.assert_close(image[2][labelled], torch.full_like(image[2][labelled], CONSTANT))
    for c in range(3):
        torch.testing.assert_close(image[c][padded], torch.full_like(image[c][padded], fill[c]))


def assert_within_half_a_pixel(image, label, w, fill=(0.0, 0.0, 0.0)):
    """Resizes: the label's source pixel is the one nearest to the point the image sampled."""
    y, x, ly, lx, labelled = decode(image, label, w)
    assert labelled.any()
    assert (y[labelled] - ly[labelled]).abs().max() <= 0.5 + 1e-3
    assert (x[labelled] - lx[labelled]).abs().max() <= 0.5 + 1e-3
    for c in range(3):
        torch.testing.assert_close(image[c][~labelled], torch.full_like(image[c][~labelled], fill[c]))


def draws(n: int = 6):
    return [torch.Generator().manual_seed(seed) for seed in range(n)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("crop", [(16, 24), (40, 64)])  # inside the image, or larger: padded
def test_random_crop_keeps_image_and_label_aligned(hw, crop):
    image, label = coordinate_pair(*hw)
    for g in draws():
        out_image, out_label = RandomCrop(crop, cat_max_ratio=1.0)(image, label, g)
        assert out_image.shape[1:] == out_label.shape == crop
        assert_same_pixels(out_image, out_label, hw[1])


@pytest.mark.parametrize("hw", SIZES)
def test_cat_max_ratio_crop_keeps_image_and_label_aligned_through_its_redraws(hw):
    """Few classes, one dominant: the window is drawn again (up to 10 times); the label must still
    be the class map of the pixels the image shows."""
    image, _ = coordinate_pair(*hw)
    h, w = hw
    rows, cols = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None].expand(h, w)
    classes = torch.where(rows < h * 3 // 4, 0, 1 + cols * 3 // w)  # class 0 covers three quarters
    redrawn = 0
    for g in draws(12):
        out_image, out_label = RandomCrop((16, 16), cat_max_ratio=0.75)(image, classes, g)
        first = RandomCrop((16, 16), cat_max_ratio=1.0)(image, classes, torch.Generator().manual_seed(g.initial_seed()))[1]
        redrawn += not torch.equal(out_label, first)
        y, x = ((out_image[0] + 1) * 128).round().long(), ((out_image[1] + 1) * 128).round().long()
        assert torch.equal(out_label, classes[y, x])
    assert redrawn > 0  # the check did move some windows


@pytest.mark.parametrize("hw", SIZES)
def test_pad_alone_fills_bottom_and_right_of_both(hw):
    image, label = coordinate_pair(*hw)
    out_image, out_label = Pad((hw[0] + 5, hw[1] + 9), fill=IMAGENET_MEAN)(image, label, torch.Generator())
    assert out_label.shape == (hw[0] + 5, hw[1] + 9)
    assert torch.equal(out_label[: hw[0], : hw[1]], label)
    assert_same_pixels(out_image, out_label, hw[1], fill=IMAGENET_MEAN)


@pytest.mark.parametrize("hw", SIZES)
def test_flip_moves_image_and_label_together(hw):
    image, label = coordinate_pair(*hw)
    flipped = 0
    for g in draws():
        out_image, out_label = RandomFlip()(image, label, g)
        flipped += not torch.equal(out_label, label)
        assert_same_pixels(out_image, out_label, hw[1])
    assert 0 < flipped < 6


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize(
    "transform",
    [Resize((80, 48)), Resize((40, 16)), RandomShortEdgeResize((20, 31, 45), max_long=100), Rescale(0.5), Rescale(0.37)],
    ids=["Resize-up", "Resize-down", "RandomShortEdgeResize", "Rescale-half", "Rescale-0.37"],
)
def test_resizes_keep_image_and_label_within_half_a_source_pixel(hw, transform):
    image, label = coordinate_pair(*hw)
    for g in draws(3):
        out_image, out_label = transform(image, label, g)
        assert out_image.shape[1:] == out_label.shape
        if isinstance(transform, Rescale):  # bicubic with antialiasing: exact on a ramp away from the borders
            out_image, out_label = out_image[:, 2:-2, 2:-2], out_label[2:-2, 2:-2]
        assert_within_half_a_pixel(out_image, out_label, hw[1])


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("keep_ratio", [True, False])
def test_random_resize_crop_flip_keeps_image_and_label_aligned(hw, keep_ratio):
    image, label = coordinate_pair(*hw)
    transform = RandomResizeCropFlip(crop=(16, 24), scale=(64, 32), ratio_range=(0.5, 2.0), keep_ratio=keep_ratio)
    padded = flipped = 0
    for g in draws(10):
        out_image, out_label = transform(image, label, g)
        assert out_image.shape[1:] == out_label.shape == (16, 24)
        padded += bool((out_label == IGNORE_INDEX).any())
        y, x, ly, lx, labelled = decode(out_image, out_label, hw[1])
        top_row = lx[0][labelled[0]]  # padding is added bottom and right before the flip: row 0 has labels
        flipped += bool(top_row[0] > top_row[-1])
        assert_within_half_a_pixel(out_image, out_label, hw[1])
    assert padded > 0 and flipped > 0  # both paths were taken


@pytest.mark.parametrize("hw", [(37, 53), (61, 23), (720, 1280)])
def test_evaluation_resize_samples_the_image_where_the_label_is_scored(hw):
    """ResizeImage leaves the label at the annotation's size and resizes the image: output pixel
    (i, j) of an h′ × w′ image must show the source point ((i + ½)·H/h′ − ½, (j + ½)·W/w′ − ½),
    which is where a bilinear resize of the prediction back to H × W reads it."""
    h, w = hw
    image, label = coordinate_pair(*hw)
    if max(hw) >= 256:  # the coordinates need more range than [-1, 1] at 128 per unit
        image = torch.stack([torch.linspace(-1, 1, h)[:, None].expand(h, w), torch.linspace(-1, 1, w)[None].expand(h, w), image[2]])
    out_image, out_label = ResizeImage((64, 40))(image, label, torch.Generator())
    assert torch.equal(out_label, label) and all(n % 8 == 0 for n in out_image.shape[1:])
    oh, ow = out_image.shape[1:]
    expect_y = ((torch.arange(oh) + 0.5) * h / oh - 0.5).clamp(0, h - 1)
    expect_x = ((torch.arange(ow) + 0.5) * w / ow - 0.5).clamp(0, w - 1)
    if max(hw) >= 256:
        got_y, got_x = (out_image[0, :, 0] + 1) / 2 * (h - 1), (out_image[1, 0] + 1) / 2 * (w - 1)
    else:
        got_y, got_x = (out_image[0, :, 0] + 1) * 128, (out_image[1, 0] + 1) * 128
    torch.testing.assert_close(got_y, expect_y, rtol=0, atol=2e-3)
    torch.testing.assert_close(got_x, expect_x, rtol=0, atol=2e-3)
