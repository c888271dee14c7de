import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.data.synthetic import SemanticScenes
from unet_seg.segmentation import candidates_to_labels, class_mask_pairs, clip_candidates, evaluate_semantic, slide_logits

K = 5


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel classifier: sliding windows cannot change its output."""
    w = torch.linspace(-1, 1, 3 * K).view(K, 3, 1, 1)
    return torch.nn.functional.conv2d(x, w)


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(8, 40), w=st.integers(8, 40), ch=st.integers(4, 48), cw=st.integers(4, 48),
    sh=st.integers(1, 24), sw=st.integers(1, 24), b=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_slide_logits_of_a_pointwise_classifier_equal_whole_image_logits(h, w, ch, cw, sh, sw, b, seed):
    image = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    sh, sw = min(sh, ch), min(sw, cw)
    out = slide_logits(pointwise, image, (ch, cw), (sh, sw), K)
    assert out.shape == (b, K, h, w)
    torch.testing.assert_close(out, pointwise(image), rtol=1e-5, atol=1e-5)


def test_slide_logits_average_overlapping_windows():
    calls = []

    def count_windows(x):
        calls.append(x.shape)
        return torch.ones(x.shape[0], 1, *x.shape[2:])

    ramp = lambda x: torch.arange(x.shape[-1], dtype=torch.float32).expand(x.shape[0], 1, *x.shape[2:])  # noqa: E731
    out = slide_logits(ramp, torch.zeros(1, 3, 4, 10), (4, 6), (4, 4), 1)
    # windows start at x = 0 and 4 (flush with the right border): columns 4, 5 are covered twice
    expected = torch.tensor([0, 1, 2, 3, (4 + 0) / 2, (5 + 1) / 2, 2, 3, 4, 5.0])
    torch.testing.assert_close(out[0, 0, 0], expected)
    slide_logits(count_windows, torch.zeros(2, 3, 4, 10), (4, 6), (4, 4), 1)
    assert calls == [torch.Size([4, 3, 4, 6])]  # 2 windows x 2 images in one call


def test_slide_logits_refuse_wrong_predict_output_and_strides_that_leave_gaps():
    with pytest.raises(ValueError, match="logits"):
        slide_logits(lambda x: x[:, :1], torch.zeros(1, 3, 8, 8), (4, 4), (4, 4), 2)
    with pytest.raises(ValueError, match="stride <= crop"):
        slide_logits(pointwise, torch.zeros(1, 3, 9, 9), (4, 4), (5, 4), K)


def test_evaluate_semantic_of_the_oracle_is_diagonal_and_of_a_constant_is_one_column():
    data = SemanticScenes(0, 6, size=32, classes=(1, 2, 3))
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    lookup = {tuple(data[i]["image"].flatten()[:8].tolist()): data[i]["label"] for i in range(len(data))}
    oracle = lambda x: torch.stack([lookup[tuple(im.flatten()[:8].tolist())] for im in x])  # noqa: E731
    conf, shown = evaluate_semantic(oracle, data, 21, torch.device("cpu"), batch_size=4, keep=3)
    assert torch.equal(conf.diagonal(), torch.bincount(labels.flatten(), minlength=21))
    assert conf.sum() == conf.diagonal().sum() and len(shown) == 3
    constant = lambda x: torch.zeros(len(x), 21, 8, 8).index_fill_(1, torch.tensor([2]), 1.0)  # noqa: E731
    conf, _ = evaluate_semantic(constant, data, 21, torch.device("cpu"))
    assert conf[:, 2].sum() == labels.numel() and conf.sum() == labels.numel()


# ---- per-class segmentation (DiGSeg)


def test_clip_candidates_keep_classes_above_either_threshold_and_never_none():
    from unet_seg.models.clip_vision import TINY_VIT, CLIPVisionEncoder, clip_preprocess

    torch.manual_seed(0)
    clip = CLIPVisionEncoder(TINY_VIT).eval()
    images = torch.rand(2, 3, 40, 48) * 2 - 1
    embeds = torch.nn.functional.normalize(torch.randn(6, TINY_VIT.projection_dim), dim=-1)
    assert clip_candidates(clip, images, embeds, -1.0, 2.0).all()  # every global score > −1
    assert clip_candidates(clip, images, embeds, 2.0, -1.0).all()  # every patch score > −1
    none = clip_candidates(clip, images, embeds, 2.0, 2.0)
    assert none.sum(1).tolist() == [1, 1]  # nothing passes: the best global class is kept
    with torch.no_grad():
        best = (torch.nn.functional.normalize(clip(clip_preprocess(images, TINY_VIT.image_size)).image_embeds, dim=-1) @ embeds.T).argmax(1)
    assert none.float().argmax(1).tolist() == best.tolist()


def test_class_mask_pairs_take_present_classes_or_absent_ones_with_empty_masks():
    labels = torch.zeros(64, 8, 8, dtype=torch.long)
    labels[:, :4] = 3
    labels[:, 4, 4] = 255
    class_ids = torch.tensor([1, 3, 7])
    torch.manual_seed(0)
    index, masks = class_mask_pairs(labels, class_ids, absent_prob=0.0)
    assert (index == 1).all() and torch.equal(masks, (labels == 3).long())
    index, masks = class_mask_pairs(labels, class_ids, absent_prob=1.0)
    assert set(index.tolist()) == {0, 2} and (masks == 0).all()


def test_class_mask_pairs_take_a_present_class_when_every_class_is_present():
    """An image showing the whole vocabulary has no absent class to draw (it raised in randint)."""
    labels = torch.tensor([[1, 3], [7, 255]]).expand(16, 2, 2)
    class_ids = torch.tensor([1, 3, 7])
    torch.manual_seed(0)
    index, masks = class_mask_pairs(labels, class_ids, absent_prob=1.0)
    assert set(index.tolist()) == {0, 1, 2}
    assert torch.equal(masks, (labels == class_ids[index].view(-1, 1, 1)).long()) and (masks.sum((1, 2)) == 1).all()


def test_candidates_to_labels_maps_argmax_to_dataset_labels_with_or_without_a_floor():
    prob = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.65]]).view(1, 2, 1, 3)  # 2 candidates, 3 pixels
    candidates, class_ids = torch.tensor([4, 1]), torch.tensor([10, 11, 12, 13, 14])
    assert candidates_to_labels(prob, candidates, class_ids, background=99, threshold=0.7).tolist() == [[[14, 11, 99]]]
    assert candidates_to_labels(prob, candidates, class_ids, background=99).tolist() == [[[14, 11, 11]]]  # plain argmax



class _AnnotationSized(torch.utils.data.Dataset):
    """Cityscapes-like items: the image resized to 8×12, the label kept at the annotation's 16×24."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict:
        label = torch.zeros(16, 24, dtype=torch.long)
        label[:, 12:] = i + 1
        return {"image": torch.zeros(3, 8, 12), "label": label}


def test_evaluate_semantic_scores_at_the_label_size_and_shows_triples_at_the_image_size():
    right_half = lambda x: (torch.arange(12) >= 6).long().expand(len(x), 8, 12)  # noqa: E731  predicts class 1
    conf, shown = evaluate_semantic(right_half, _AnnotationSized(), 4, torch.device("cpu"), keep=2)
    assert conf.sum() == 3 * 16 * 24 and conf[1, 1] == 16 * 12 and conf[3, 1] == 16 * 12
    assert len(shown) == 2
    for i, (image, pred, label) in enumerate(shown):  # each can be overlaid on its image
        assert image.shape == (3, 8, 12) and pred.shape == label.shape == (8, 12)
        assert torch.equal(label[:, 6:], torch.full((8, 6), i + 1)) and label[:, :6].eq(0).all()
        assert torch.equal(pred, right_half(image[None])[0])


# ------------------------------------------------------------------------ sharded evaluation, 2 processes


class _NumberedItems(torch.utils.data.Dataset):
    """Item i: a 2×3 image and label filled with i, so the confusion matrix counts each item in its
    own diagonal cell: an item evaluated twice or never shows as 12 or 0 pixels there."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 2, 3), float(i)), "label": torch.full((2, 3), i, dtype=torch.long)}


def _read_number(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].round().long()


def _evaluate_on_rank(rank: int, world: int, init_file: str, n: int, batch_size: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        conf, _ = evaluate_semantic(_read_number, _NumberedItems(n), n, torch.device("cpu"), batch_size=batch_size)
        torch.save(conf, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_on_two_gloo_processes_counts_every_item_exactly_once(tmp_path):
    """Two real gloo processes share the evaluation: each rank's all-reduced confusion is 6·I (every
    item once), as in one process. Fails for a duplicated or dropped shard and for a missing
    all-reduce (each rank would hold only its own items)."""
    import torch.multiprocessing as mp

    n, batch_size, world, out = 5, 2, 2, str(tmp_path / "conf")  # uneven shards (3 + 2), a partial batch
    mp.spawn(_evaluate_on_rank, args=(world, str(tmp_path / "pg"), n, batch_size, out), nprocs=world, join=True)
    alone, _ = evaluate_semantic(_read_number, _NumberedItems(n), n, torch.device("cpu"), batch_size=batch_size)
    expected = 6 * torch.eye(n, dtype=torch.long)
    assert torch.equal(alone, expected)
    for rank in range(world):
        assert torch.equal(torch.load(f"{out}.{rank}", weights_only=True), expected), f"rank {rank}"


def _oracle_x0(target: torch.Tensor):
    """An x0-parameterised denoiser that always predicts `target` [B·K, 4, h, w] (checking its inputs' shapes)."""

    def denoiser(y_t, z_x, t, class_embeds):
        assert y_t.shape == z_x.shape and class_embeds.shape[0] == y_t.shape[0] == t.shape[0]
        return target.repeat(y_t.shape[0] // target.shape[0], 1, 1, 1)

    return denoiser


class NearestCodec:
    """8×8 block means in, nearest upsampling out: exact for block-constant images."""

    def encode(self, img):
        return torch.cat([torch.nn.functional.avg_pool2d(img, 8), torch.zeros_like(img[:, :1, ::8, ::8])], 1)

    def decode(self, z):
        return z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), blocks=st.integers(1, 4), classes=st.integers(1, 30), ensemble=st.integers(1, 3),
    steps=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_denoise_label_maps_decodes_the_denoised_palette_latent_to_its_labels(b, blocks, classes, ensemble, steps, seed):
    """One run per image (DiGSeg §3.4, App. B): a denoiser that predicts the palette latent of a
    label map returns that label map, whatever E and S; ignore pixels come back as the last index."""
    from unet_seg.codecs import labels_to_palette_latent, make_palette
    from unet_seg.diffusion import NoiseSchedule
    from unet_seg.segmentation import denoise_label_maps

    g = torch.Generator().manual_seed(seed)
    palette, codec = make_palette(classes + 1), NearestCodec()
    coarse = torch.randint(0, classes + 2, (b, blocks, blocks), generator=g)  # classes + 1 is "ignore"
    labels = torch.where(coarse == classes + 1, 255, coarse).repeat_interleave(8, 1).repeat_interleave(8, 2)
    target = labels_to_palette_latent(codec, labels, palette)
    images = torch.rand(b, 3, 8 * blocks, 8 * blocks, generator=g) * 2 - 1
    index = denoise_label_maps(_oracle_x0(target), codec, NoiseSchedule.sd("sample"), images, torch.zeros(1, 7), palette,
                               ensemble, steps)  # fmt: skip
    assert index.shape == labels.shape and index.dtype == torch.long
    assert torch.equal(index, torch.where(labels == 255, classes, labels))


class TrainableCodec(NearestCodec, torch.nn.Module):
    """NearestCodec with a trainable output gain: decoding records autograd history unless no_grad."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.gain = torch.nn.Parameter(torch.ones(()))

    def decode(self, z):
        return self.gain * super().decode(z)


def test_denoising_samplers_decode_without_autograd_history():
    """Inference only: the decode of a VAE whose weights require grad keeps no graph (memory)."""
    from unet_seg.codecs import labels_to_palette_latent, make_palette
    from unet_seg.diffusion import NoiseSchedule
    from unet_seg.segmentation import denoise_class_masks, denoise_label_maps

    codec, palette = TrainableCodec(), make_palette(3)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    denoiser = _oracle_x0(labels_to_palette_latent(codec, labels, palette))
    images, schedule = torch.zeros(1, 3, 8, 8), NoiseSchedule.sd("sample")
    assert not denoise_class_masks(denoiser, codec, schedule, images, torch.zeros(1, 7), 1, 1).requires_grad
    assert not denoise_label_maps(denoiser, codec, schedule, images, torch.zeros(1, 7), palette, 1, 1).requires_grad


class CountingCodec(NearestCodec):
    """NearestCodec recording how many latents each decode call holds."""

    def __init__(self):
        self.decoded = []

    def decode(self, z):
        self.decoded.append(z.shape[0])
        return super().decode(z)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(1, 6), rows=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_class_masks_decode_at_most_decode_rows_latents_per_call_and_equal_one_decode(b, k, rows, seed):
    """The VAE decodes B·K latents in calls of at most `decode_rows` (its memory grows with the
    batch: ≈ 0.9 GB per 512² latent in fp32), and the probabilities equal those of one decode."""
    from unet_seg.diffusion import NoiseSchedule
    from unet_seg.segmentation import denoise_class_masks

    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b * k, 4, 2, 2, generator=g)
    images, embeds, schedule = torch.rand(b, 3, 16, 16, generator=g), torch.randn(k, 5, generator=g), NoiseSchedule.sd("sample")
    chunked, whole = CountingCodec(), CountingCodec()
    prob = denoise_class_masks(_oracle_x0(target), chunked, schedule, images, embeds, 1, 1, decode_rows=rows)
    once = denoise_class_masks(_oracle_x0(target), whole, schedule, images, embeds, 1, 1, decode_rows=b * k)
    assert prob.shape == (b, k, 16, 16) and torch.equal(prob, once)
    assert sum(chunked.decoded) == b * k and max(chunked.decoded) <= rows and len(chunked.decoded) == -(-b * k // rows)
    assert whole.decoded == [b * k]
    with pytest.raises(ValueError, match="decode_rows must be a positive"):
        denoise_class_masks(_oracle_x0(target), whole, schedule, images, embeds, 1, 1, decode_rows=0)
