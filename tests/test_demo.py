"""The demo stand-in for SD's pre-training: it trains, reproducibly, leaves the U-Net frozen and
the global RNG alone, and hands the scenes' labels to the conditioning."""

import pytest
import torch

from unet_seg.demo import BlockCodec, pretrain_denoiser, whiten
from unet_seg.diffusion import NoiseSchedule
from unet_seg.models import TINY_SD2, UNet


def _pretrained(seed: int, steps: int = 2, seen: list | None = None, prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    unet = UNet(TINY_SD2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}

    def condition(labels):
        if seen is not None:
            seen.append(labels)
        return torch.zeros(len(labels), 77, TINY_SD2.context_dim)

    loss = pretrain_denoiser(unet, BlockCodec(), NoiseSchedule.sd(prediction_type), steps, 64, seed, condition, batch_size=2)
    return unet, before, loss


def test_pretraining_changes_the_weights_and_leaves_them_frozen_in_eval_mode():
    unet, before, loss = _pretrained(seed=0)
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_pretraining_is_reproducible_per_seed():
    a, _, loss_a = _pretrained(seed=0)
    b, _, loss_b = _pretrained(seed=0)
    c, _, loss_c = _pretrained(seed=1)
    assert loss_a == loss_b and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert loss_c != loss_a


def test_pretraining_draws_nothing_from_the_global_rng():
    torch.manual_seed(0)
    unet = UNet(TINY_SD2)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    pretrain_denoiser(unet, BlockCodec(), NoiseSchedule.sd(), 1, 64, 0, lambda y: torch.zeros(len(y), 77, TINY_SD2.context_dim), batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_conditioning_sees_each_steps_label_maps():
    seen = []
    _pretrained(seed=0, steps=2, seen=seen, prediction_type="v_prediction")
    assert len(seen) == 2 and all(y.shape == (2, 64, 64) and y.dtype == torch.long for y in seen)
    assert all(int(y.max()) > 0 for y in seen)  # scenes hold objects, not background alone


def test_pretraining_refuses_no_steps():
    with pytest.raises(ValueError, match="steps"):
        pretrain_denoiser(UNet(TINY_SD2), BlockCodec(), NoiseSchedule.sd(), 0, 64, 0, lambda y: y)


def test_whiten_turns_nearly_parallel_embeddings_into_a_regular_simplex():
    torch.manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.ones(5, 32) + 0.01 * torch.randn(5, 32), dim=-1)  # cosine ~0.999
    w = whiten(embeds)
    cos = w @ w.T
    assert torch.allclose(cos.diagonal(), torch.ones(5), atol=1e-5)
    off = cos[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 4), atol=1e-4)


def test_pretrain_unless_resuming_trains_once_then_leaves_the_checkpointed_unet_alone(tmp_path):
    from unet_seg.demo import pretrain_unless_resuming, tiny_sd
    from unet_seg.train import save_checkpoint

    torch.manual_seed(0)
    sd = tiny_sd()
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    loss = pretrain_unless_resuming(sd, out=tmp_path, resume=False, steps=1, size=64, seed=0, batch_size=2)
    assert loss is not None and not sd.unet.training and not any(p.requires_grad for p in sd.unet.parameters())
    assert any(not torch.equal(before[k], v) for k, v in sd.unet.state_dict().items())  # it trained
    assert pretrain_unless_resuming(sd, out=tmp_path, resume=True, steps=1, size=64, seed=0) is not None  # nothing saved yet
    save_checkpoint(tmp_path, 1, {"unet": sd.unet})
    trained = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    assert pretrain_unless_resuming(sd, out=tmp_path, resume=True, steps=1, size=64, seed=0) is None
    assert all(torch.equal(trained[k], v) for k, v in sd.unet.state_dict().items())
