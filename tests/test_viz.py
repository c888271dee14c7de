import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from unet_seg.viz import IGNORE_GREY, PALETTE, image_to_uint8, overlay, save_grid

seeds = st.integers(0, 2**31 - 1)
sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))


def random_image(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_labels(h, w, seed, high=21):
    labels = torch.randint(high, (h, w), generator=torch.Generator().manual_seed(seed))
    return torch.where(labels == high - 1, 255, labels)


def test_palette_is_256_distinct_colours_with_black_background_and_grey_only_for_ignore():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert tuple(PALETTE[0]) == (0, 0, 0) and tuple(PALETTE[255]) == IGNORE_GREY
    assert len({tuple(c) for c in PALETTE}) == 256
    spread = PALETTE[1:255].max(1).astype(int) - PALETTE[1:255].min(1)
    assert spread.min() > 40  # saturated: no label colour is a grey


def test_first_label_colours_are_far_apart():
    colours = PALETTE[1:21].astype(float)
    dist = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(20) * 1e9
    assert dist.min() > 30


@given(st.tuples(st.integers(2, 24), st.integers(1, 24)), seeds)
def test_image_to_uint8_is_hwc_uint8_with_minus_one_black_and_one_white(size, seed):
    image = random_image(*size, seed)
    image[:, 0, 0] = -1
    image[:, -1, -1] = 1
    out = image_to_uint8(image)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 0).all() and (out[-1, -1] == 255).all()
    expected = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.abs(out - expected).max() == 0


@given(sizes, seeds, st.floats(0, 1))
def test_overlay_keeps_background_pixels_and_blends_labelled_ones(size, seed, alpha):
    image, labels = random_image(*size, seed), random_labels(*size, seed)
    out = overlay(image, labels, alpha=alpha)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    rgb = image_to_uint8(image)
    lab = labels.numpy()
    assert (out[lab == 0] == rgb[lab == 0]).all()
    expected = np.round((1 - alpha) * rgb + alpha * PALETTE[lab].astype(float)).astype(np.uint8)
    assert (out[lab != 0] == expected[lab != 0]).all()


@given(sizes, seeds)
def test_overlay_at_alpha_one_paints_palette_and_grey_for_ignore(size, seed):
    image, labels = random_image(*size, seed), random_labels(*size, seed)
    out = overlay(image, labels, alpha=1.0)
    lab = labels.numpy()
    assert (out[lab == 255] == np.array(IGNORE_GREY, np.uint8)).all()
    assert (out[(lab != 0) & (lab != 255)] == PALETTE[lab[(lab != 0) & (lab != 255)]]).all()


@given(sizes, seeds)
def test_overlay_of_bool_mask_equals_overlay_of_its_0_1_labels(size, seed):
    image = random_image(*size, seed)
    mask = torch.rand(size, generator=torch.Generator().manual_seed(seed + 1)) > 0.5
    assert (overlay(image, mask) == overlay(image, mask.long())).all()


def test_overlay_uses_a_given_palette_and_keeps_ignore_grey():
    image = torch.zeros(3, 2, 2)
    labels = torch.tensor([[0, 1], [2, 255]])
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    out = overlay(image, labels, palette, alpha=1.0)
    assert out[0, 1].tolist() == [255, 0, 0] and out[1, 0].tolist() == [0, 0, 255]
    assert out[1, 1].tolist() == list(IGNORE_GREY) and out[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    "image, labels, kwargs",
    [
        (torch.zeros(3, 4, 4), torch.zeros(4, 4), {}),  # float labels
        (torch.zeros(3, 4, 4), torch.zeros(4, 5, dtype=torch.long), {}),  # shape mismatch
        (torch.zeros(3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), {}),  # batched labels
        (torch.zeros(4, 4, 3), torch.zeros(4, 4, dtype=torch.long), {}),  # HWC image
        (torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.long), {}),  # uint8 image
        (torch.zeros(3, 4, 4), torch.full((4, 4), 3), {"palette": PALETTE[:3]}),  # label outside palette
        (torch.zeros(3, 4, 4), torch.full((4, 4), 300), {}),
        (torch.zeros(3, 4, 4), torch.full((4, 4), -1), {}),
        (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long), {"palette": PALETTE.astype(float)}),
        (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long), {"alpha": 1.5}),
    ],
)
def test_overlay_rejects_bad_input(image, labels, kwargs):
    with pytest.raises(ValueError):
        overlay(image, labels, **kwargs)


@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(1, 3), st.booleans(), seeds)
def test_save_grid_writes_a_png_of_the_expected_size_and_content(
    tmp_path_factory, row_lengths, scale, with_titles, seed
):
    tmp = tmp_path_factory.mktemp("grid")
    rng = np.random.default_rng(seed)
    rows = [
        [rng.integers(0, 256, (8 + 2 * c, 10 + r, 3), dtype=np.uint8) for c in range(n)]
        for r, n in enumerate(row_lengths)
    ]
    titles = [f"col {c}" for c in range(max(row_lengths))] if with_titles else None
    path = tmp / "sub" / "grid.png"
    save_grid(rows, path, titles=titles, scale=scale)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        pixels = np.asarray(im)
    cell_h = max(p.shape[0] for row in rows for p in row) * scale
    cell_w = max(p.shape[1] for row in rows for p in row) * scale
    columns = max(row_lengths)
    title_h = pixels.shape[0] - len(rows) * cell_h - (len(rows) + 1) * 2
    assert pixels.shape[1] == columns * cell_w + (columns + 1) * 2
    assert (title_h > 0) == with_titles
    last = rows[-1][-1]
    top = title_h + 2 + (len(rows) - 1) * (cell_h + 2)
    left = 2 + (len(rows[-1]) - 1) * (cell_w + 2)
    placed = pixels[top : top + last.shape[0] * scale, left : left + last.shape[1] * scale]
    assert (placed == last.repeat(scale, 0).repeat(scale, 1)).all()
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left


def test_save_grid_replaces_an_existing_file(tmp_path):
    path = tmp_path / "grid.png"
    save_grid([[np.zeros((4, 4, 3), np.uint8)]], path)
    save_grid([[np.full((6, 6, 3), 200, np.uint8)]], path, scale=2)
    with Image.open(path) as im:
        assert im.size == (16, 16) and np.asarray(im)[5, 5].tolist() == [200, 200, 200]


@pytest.mark.parametrize(
    "rows, scale",
    [
        ([], 1),
        ([[]], 1),
        ([[np.zeros((4, 4), np.uint8)]], 1),
        ([[np.zeros((4, 4, 3), np.float32)]], 1),
        ([[torch.zeros(4, 4, 3, dtype=torch.uint8)]], 1),
        ([[np.zeros((4, 4, 3), np.uint8)]], 0),
    ],
)
def test_save_grid_rejects_bad_panels_and_writes_nothing(rows, scale, tmp_path):
    with pytest.raises(ValueError):
        save_grid(rows, tmp_path / "grid.png", scale=scale)
    assert list(tmp_path.iterdir()) == []
