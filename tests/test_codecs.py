import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.codecs import (

    IGNORE_COLOUR,
    check_mask,
    image_to_probability,
    label_map_to_latents,
    label_map_to_masks,
    labels_to_palette_image,
    labels_to_palette_latent,
    latent_to_probability,
    latents_to_label_map,
    make_palette,
    mask_to_image,
    mask_to_latent,
    masks_to_label_map,
    palette_image_to_labels,
    palette_latent_to_labels,
)
from unet_seg.demo import BlockCodec

from .helpers import rand


class BlockVAE:
    """Stand-in VAE with the real contract: encode = 8×8 average pool, then a fixed full-rank
    3 -> 4 channel mix times SD's scaling factor; decode = the mix's left inverse, then nearest
    ×8 upsampling. It reproduces any image that is constant on 8×8 blocks, and nothing else, so
    an exact codec round trip through it tests the codec's arithmetic, not the VAE."""

    mix = torch.tensor([[0.6, -0.3, 0.2], [0.1, 0.8, -0.4], [-0.5, 0.2, 0.7], [0.3, 0.3, 0.3]], dtype=torch.float64)
    scale = 0.18215

    def encode(self, img):
        assert img.ndim == 4 and img.shape[1] == 3 and img.shape[2] % 8 == 0 and img.shape[3] % 8 == 0
        assert img.is_floating_point() and img.abs().max() <= 1, "the VAE takes images in [-1, 1]"
        pooled = F.avg_pool2d(img.double(), 8)
        return (torch.einsum("oc,bchw->bohw", self.mix, pooled) * self.scale).to(img.dtype)

    def decode(self, z):
        unmix = torch.linalg.pinv(self.mix)
        x = torch.einsum("co,bohw->bchw", unmix, z.double() / self.scale)
        return F.interpolate(x, scale_factor=8, mode="nearest").to(z.dtype)


def blocky(x, size=8):
    """Repeat each pixel of [..., h, w] into a size×size block."""
    return x.repeat_interleave(size, -2).repeat_interleave(size, -1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))  # B, blocks down, blocks across
seeds = st.integers(0, 2**31 - 1)


def random_mask(b, h, w, seed, ignore=True):
    values = torch.tensor([0, 1, 255] if ignore else [0, 1])
    return values[torch.randint(len(values), (b, h, w), generator=gen(seed))]


def random_image(b, h, w, seed, low=-1.0, high=1.0):
    return torch.rand(b, 3, h, w, generator=gen(seed)) * (high - low) + low


def tinted(image):
    """DiffewS' overlay foreground: the image blended half-way to red."""
    return 0.5 * image + 0.5 * torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)


def encodings(image):
    """The four DiffewS encodings as (foreground, background)."""
    return {
        "white_on_black": (1.0, -1.0),
        "foreground_on_black": (image, -1.0),
        "black_on_background": (-1.0, image),
        "overlay": (tinted(image), image),
    }


# ---------------------------------------------------------------------------------------------
# Image space


@given(shapes, seeds)
def test_white_on_black_decoding_is_channel_mean_mapped_to_unit_interval(shape, seed):
    b, h, w = shape
    x = random_image(b, h, w, seed, -1.3, 1.3)  # decoded images overshoot [-1, 1]
    expected = ((x.mean(1) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(image_to_probability(x), expected, atol=1e-6, rtol=0)


@given(shapes, seeds, st.sampled_from(["white_on_black", "foreground_on_black", "black_on_background", "overlay"]))
def test_image_round_trip_recovers_mask_for_every_encoding(shape, seed, name):
    b, h, w = shape
    mask = random_mask(b, h, w, seed)
    image = random_image(b, h, w, seed + 1)
    fg, bg = encodings(image)[name]
    x = mask_to_image(mask, fg, bg)
    assert x.shape == (b, 3, h, w) and x.abs().max() <= 1
    prob = image_to_probability(x, fg, bg)
    torch.testing.assert_close(prob, (mask == 1).float(), atol=1e-5, rtol=0)


def test_encodings_paint_what_diffews_describes():
    mask = torch.tensor([[[1, 0]]])
    image = torch.tensor([0.2, -0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    grey = torch.tensor([0.2, -0.4, 0.6])
    px = lambda x, j: x[0, :, 0, j]  # noqa: E731
    white = mask_to_image(mask)
    assert px(white, 0).tolist() == [1, 1, 1] and px(white, 1).tolist() == [-1, -1, -1]
    fg_on_black = mask_to_image(mask, image, -1.0)
    assert torch.equal(px(fg_on_black, 0), grey) and px(fg_on_black, 1).tolist() == [-1, -1, -1]
    black_on_bg = mask_to_image(mask, -1.0, image)
    assert px(black_on_bg, 0).tolist() == [-1, -1, -1] and torch.equal(px(black_on_bg, 1), grey)
    overlay = mask_to_image(mask, tinted(image), image)
    torch.testing.assert_close(px(overlay, 0), torch.tensor([0.6, -0.7, -0.2]))
    assert torch.equal(px(overlay, 1), grey)


def test_ignore_pixels_are_painted_as_background():
    assert torch.equal(mask_to_image(torch.tensor([[[255]]])), torch.full((1, 3, 1, 1), -1.0))


def test_pixels_where_renderings_coincide_decode_to_zero():
    image = torch.full((1, 3, 1, 1), -1.0)  # a black pixel: (b) paints it the same either way
    x = mask_to_image(torch.ones(1, 1, 1, dtype=torch.long), image, -1.0)
    assert image_to_probability(x, image, -1.0).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_image_codec_preserves_dtype(dtype):
    mask = torch.tensor([[[0, 1], [1, 0]]])  # no 255: bfloat16 rounds it to 256
    image = torch.zeros(1, 3, 2, 2, dtype=dtype)
    assert mask_to_image(mask, image, -1.0).dtype == dtype
    assert mask_to_image(mask.to(dtype)).dtype == dtype
    assert mask_to_image(mask).dtype == torch.float32
    assert image_to_probability(image).dtype == dtype


# ---------------------------------------------------------------------------------------------
# Label maps


@given(shapes, seeds, st.integers(1, 6))
def test_label_map_to_masks_is_one_hot_outside_ignore(shape, seed, num_classes):
    b, h, w = shape
    labels = torch.randint(num_classes + 1, (b, h, w), generator=gen(seed))
    labels[labels == num_classes] = 255
    masks = label_map_to_masks(labels, num_classes)
    assert masks.shape == (b, num_classes, h, w) and masks.dtype == torch.long
    assert torch.equal(masks.sum(1), (labels != 255).long())
    assert torch.equal(masks_to_label_map(masks.float(), background_label=255), labels)


def test_masks_to_label_map_takes_argmax_and_background_below_threshold():
    prob = torch.tensor([[[[0.9, 0.2, 0.69]], [[0.1, 0.8, 0.5]]]])  # [1, 2 classes, 1, 3]
    assert masks_to_label_map(prob, background_label=7).tolist() == [[[0, 1, 7]]]
    assert masks_to_label_map(prob, background_label=7, background_threshold=0.5).tolist() == [[[0, 1, 0]]]


@given(st.integers(1, 300))
def test_palette_colours_are_distinct_in_range_and_avoid_ignore_colour(num_classes):
    palette = make_palette(num_classes)
    assert palette.shape == (num_classes, 3) and palette.dtype == torch.float32
    assert palette.abs().max() <= 1
    with_ignore = torch.cat([palette, torch.tensor([IGNORE_COLOUR])])
    d = torch.cdist(with_ignore, with_ignore) + torch.eye(num_classes + 1) * 10
    assert d.min() > 0.2  # k <= 8 for C <= 300: grid spacing 2/7, grey at least 0.25 away


@given(shapes, seeds, st.integers(1, 30))
def test_palette_image_round_trip_is_exact(shape, seed, num_classes):
    b, h, w = shape
    labels = torch.randint(num_classes + 1, (b, h, w), generator=gen(seed))
    labels[labels == num_classes] = 255
    palette = make_palette(num_classes)
    image = labels_to_palette_image(labels, palette)
    assert image.shape == (b, 3, h, w) and image.abs().max() <= 1
    noise = (torch.rand(image.shape, generator=gen(seed + 1)) - 0.5) * 0.1  # well under half the spacing
    assert torch.equal(palette_image_to_labels(image + noise, palette), labels)


# ---------------------------------------------------------------------------------------------
# Through a VAE: exact round trips with the block stand-in


@given(shapes, seeds)
def test_mask_latent_round_trip_through_block_vae_is_exact(shape, seed):
    b, h, w = shape
    vae = BlockVAE()
    mask = blocky(random_mask(b, h, w, seed))
    z = mask_to_latent(vae, mask)
    assert z.shape == (b, 4, h, w)
    prob = latent_to_probability(vae, z)
    torch.testing.assert_close(prob, (mask == 1).float(), atol=1e-5, rtol=0)
    assert torch.equal((prob > 0.5).long(), (mask == 1).long())


@given(shapes, seeds)
def test_foreground_on_black_latent_round_trip_through_block_vae_is_exact(shape, seed):
    b, h, w = shape
    vae = BlockVAE()
    mask = blocky(random_mask(b, h, w, seed, ignore=False))
    image = blocky(random_image(b, h, w, seed + 1, -0.5, 1.0))  # no pixel is black
    prob = latent_to_probability(vae, mask_to_latent(vae, mask, image, -1.0), image, -1.0)
    assert torch.equal((prob > 0.5).long(), mask)


@given(shapes, seeds, st.integers(1, 5))
def test_per_class_latent_round_trip_through_block_vae_is_exact(shape, seed, num_classes):
    b, h, w = shape
    vae = BlockVAE()
    labels = torch.randint(num_classes + 1, (b, h, w), generator=gen(seed))
    labels[labels == num_classes] = 255
    labels = blocky(labels)
    z = label_map_to_latents(vae, labels, num_classes)
    assert z.shape == (b, num_classes, 4, h, w)
    assert torch.equal(latents_to_label_map(vae, z, background_label=255), labels)


@given(shapes, seeds, st.integers(1, 40))
def test_palette_latent_round_trip_through_block_vae_is_exact(shape, seed, num_classes):
    b, h, w = shape
    vae = BlockVAE()
    labels = torch.randint(num_classes + 1, (b, h, w), generator=gen(seed))
    labels[labels == num_classes] = 255
    labels = blocky(labels)
    palette = make_palette(num_classes)
    z = labels_to_palette_latent(vae, labels, palette)
    assert z.shape == (b, 4, h, w)
    assert torch.equal(palette_latent_to_labels(vae, z, palette), labels)


def test_block_vae_does_not_reproduce_masks_that_are_not_block_constant():
    # Guards the stand-in itself: an exact round trip above means the codec is exact, not that
    # the stand-in passes anything through.
    vae = BlockVAE()
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :4] = 1
    prob = latent_to_probability(vae, mask_to_latent(vae, mask))
    torch.testing.assert_close(prob, torch.full((1, 8, 8), 0.5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Through the real (random-weight) VAE: shapes and ranges


@pytest.fixture(scope="module")
def tiny_vae():
    from unet_seg.models.vae import TINY_VAE, AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(TINY_VAE).eval()


@given(seeds)
def test_real_vae_codecs_give_latent_shapes_and_valid_outputs(tiny_vae, seed):
    mask = random_mask(2, 16, 24, seed)
    labels = torch.randint(3, (2, 16, 24), generator=gen(seed))
    palette = make_palette(3)
    with torch.no_grad():
        z = mask_to_latent(tiny_vae, mask)
        prob = latent_to_probability(tiny_vae, z)
        z_classes = label_map_to_latents(tiny_vae, labels, 3)
        per_class = latents_to_label_map(tiny_vae, z_classes, background_label=255)
        z_palette = labels_to_palette_latent(tiny_vae, labels, palette)
        from_palette = palette_latent_to_labels(tiny_vae, z_palette, palette)
    assert z.shape == (2, 4, 2, 3) and torch.isfinite(z).all()
    assert prob.shape == (2, 16, 24) and prob.min() >= 0 and prob.max() <= 1
    assert z_classes.shape == (2, 3, 4, 2, 3)
    assert per_class.shape == (2, 16, 24) and ((per_class < 3) | (per_class == 255)).all()
    assert z_palette.shape == (2, 4, 2, 3)
    assert from_palette.shape == (2, 16, 24) and ((from_palette < 3) | (from_palette == 255)).all()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_non_binary_mask_is_rejected():
    with pytest.raises(ValueError, match=r"0/1 \(255 = ignore\), found values \[2\]"):
        mask_to_image(torch.tensor([[[0, 2]]]))
    with pytest.raises(ValueError, match="found values"):
        mask_to_image(torch.tensor([[[0.5, 1.0]]]))


def test_check_mask_rejects_what_mask_to_image_rejects_and_unchecked_painting_agrees_on_valid_masks():
    with pytest.raises(ValueError, match=r"support mask must hold 0/1 \(255 = ignore\), found values \[3\]"):
        check_mask(torch.tensor([[[0, 1, 3]]]), "support mask")
    with pytest.raises(ValueError, match=r"mask must be \[B, H, W\]"):
        check_mask(torch.zeros(1, 1, 8, 8))
    valid = torch.randint(0, 2, (2, 8, 8), generator=torch.Generator().manual_seed(12))
    valid.masked_fill_(rand(2, 8, 8, seed=13) < 0.2, 255)
    check_mask(valid)
    assert torch.equal(mask_to_image(valid, check=False), mask_to_image(valid))
    assert torch.equal(mask_to_latent(BlockVAE(), valid, check=False), mask_to_latent(BlockVAE(), valid))


def test_wrong_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"mask must be \[B, H, W\]"):
        mask_to_image(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"foreground must be \[B, 3, H, W\] matching"):
        mask_to_image(torch.zeros(1, 8, 8), torch.zeros(1, 3, 4, 4), -1.0)
    with pytest.raises(ValueError, match=r"image must be \[B, 3, H, W\]"):
        image_to_probability(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"per-class latents \[B, C, 4, h, w\]"):
        latents_to_label_map(BlockVAE(), torch.zeros(1, 4, 1, 1), background_label=255)


def test_sizes_not_divisible_by_8_are_rejected():
    with pytest.raises(ValueError, match="multiples of 8"):
        mask_to_latent(BlockVAE(), torch.zeros(1, 12, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of 8"):
        labels_to_palette_latent(BlockVAE(), torch.zeros(1, 16, 20, dtype=torch.long), make_palette(2))


def test_bad_labels_are_rejected():
    with pytest.raises(TypeError, match="integer"):
        label_map_to_masks(torch.zeros(1, 2, 2), 3)
    with pytest.raises(ValueError, match=r"in \[0, 3\) or 255 \(ignore\), found \[3\]"):
        label_map_to_masks(torch.tensor([[[0, 3]]]), 3)


def test_palette_holding_the_ignore_colour_is_rejected():
    with pytest.raises(ValueError, match="ignore colour"):
        labels_to_palette_image(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# BlockCodec: the weight-free VAE stand-in of the CPU demos


@given(shapes, seeds, st.sampled_from([torch.float32, torch.float64]))
def test_block_codec_latent_is_block_mean_and_texture_energy_and_keeps_dtype(shape, seed, dtype):
    b, h, w = shape
    img = (torch.rand(b, 3, 8 * h, 8 * w, generator=gen(seed)) * 2 - 1).to(dtype)
    z = BlockCodec().encode(img, sample=True, generator=gen(seed))
    assert z.shape == (b, 4, h, w) and z.dtype == dtype
    blocks = img.unflatten(2, (h, 8)).unflatten(4, (w, 8))  # [b, 3, h, 8, w, 8]
    torch.testing.assert_close(z[:, :3], blocks.mean((3, 5)))
    energy = blocks.var((3, 5), unbiased=False).mean(1).sqrt() * 4 - 1
    torch.testing.assert_close(z[:, 3], energy)


@given(shapes, seeds)
def test_block_codec_round_trips_constant_images_and_keeps_masks_in_probability_range(shape, seed):
    b, h, w = shape
    codec = BlockCodec()
    colour = torch.rand(b, 3, 1, 1, generator=gen(seed)) * 2 - 1
    img = colour.expand(b, 3, 8 * h, 8 * w)
    torch.testing.assert_close(codec.decode(codec.encode(img)), img)
    mask = random_mask(b, 8 * h, 8 * w, seed, ignore=False)
    prob = latent_to_probability(codec, mask_to_latent(codec, mask))
    assert prob.shape == mask.shape and prob.min() >= 0 and prob.max() <= 1
    torch.testing.assert_close(latent_to_probability(codec, mask_to_latent(codec, blocky(mask[:, ::8, ::8]))).mean(),
                               blocky(mask[:, ::8, ::8]).float().mean(), atol=0.1, rtol=0)


def test_block_codec_rejects_bad_shapes():
    codec = BlockCodec()
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        codec.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        codec.decode(torch.zeros(1, 3, 2, 2))
