"""load_sd on diffusers folders, hub ids (offline cache) and original single files."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unet_seg import ldm
from unet_seg.hub import CheckpointError
from unet_seg.hub_config import text_to_transformers, unet_to_diffusers, vae_to_diffusers
from unet_seg.models.clip import SD1_TEXT, SD2_TEXT, CLIPTextConfig, CLIPTextEncoder
from unet_seg.models.unet import SD15, SD21, TINY_SD1, TINY_SD2, UNet
from unet_seg.models.vae import SD_VAE, TINY_VAE, AutoencoderKL
from unet_seg.pretrained import from_pretrained, save_pretrained
from unet_seg.sd import load_sd

from .helpers import fake_hub_cache, perturb_, rand, randn, rel_err, write_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# Text encoders with 64-wide heads, as SD's (single files store no head count).
TEXT = {
    "sd1": CLIPTextConfig(width=64, layers=2, heads=1, mlp_dim=128, act="quick_gelu"),
    "sd2": CLIPTextConfig(width=128, layers=3, heads=2, mlp_dim=256, act="gelu"),
}
UNETS = {"sd1": replace(TINY_SD1, context_dim=64), "sd2": replace(TINY_SD2, context_dim=128)}
PROMPTS = ["a photo of a cat", "Two dogs!! on the  beach, 4k", ""]


def write_diffusers_folder(root: Path, family: str) -> Path:
    """A random-weight SD checkpoint in the diffusers hub layout, written by the reference libraries."""
    perturb_(diffusers.UNet2DConditionModel(**unet_to_diffusers(UNETS[family])), 1).save_pretrained(root / "unet")
    perturb_(diffusers.AutoencoderKL(**vae_to_diffusers(TINY_VAE)), 2).save_pretrained(root / "vae")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_to_transformers(TEXT[family])))
    perturb_(text, 3).save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer", "!" if family == "sd2" else "<|endoftext|>")
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction
    ).save_config(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tmp_path_factory):
    return request.param, write_diffusers_folder(tmp_path_factory.mktemp(request.param), request.param)


def single_file_of(sd, path: Path, openclip: bool) -> Path:
    tensors = ldm.to_ldm(
        sd.unet.state_dict(), sd.vae.state_dict(), sd.text_encoder.state_dict(),
        sd.unet.config, sd.vae.config, openclip=openclip,
    )  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_diffusers_folder_loads_every_component(folder):
    family, root = folder
    sd = load_sd(root)
    text_ref = transformers.CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    ids = sd.tokenizer(PROMPTS)
    with torch.no_grad():
        assert rel_err(sd.text_encoder(ids), text_ref(ids).last_hidden_state) <= 1e-6  # measured 0.0
        context = sd.encode_prompt(PROMPTS)
    assert context.shape == (3, 77, UNETS[family].context_dim)
    assert ids[2, 2].item() == (0 if family == "sd2" else 49407)  # pad id from tokenizer_config.json
    assert sd.schedule.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    ref_sched = diffusers.DDIMScheduler.from_pretrained(root / "scheduler")
    assert torch.equal(sd.schedule.alphas_cumprod, ref_sched.alphas_cumprod)


def test_single_file_equals_folder(folder, tmp_path):
    family, root = folder
    from_folder = load_sd(root)
    path = single_file_of(from_folder, tmp_path / "model.safetensors", openclip=family == "sd2")
    from_file = load_sd(path)
    assert f"inferred {family.upper()}" in from_file.notes
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert from_file.unet.config == from_folder.unet.config
    assert from_file.vae.config == from_folder.vae.config
    assert from_file.text_encoder.config == from_folder.text_encoder.config
    assert torch.equal(from_file.tokenizer(PROMPTS), from_folder.tokenizer(PROMPTS))
    assert from_file.schedule.prediction_type == from_folder.schedule.prediction_type
    assert torch.equal(from_file.schedule.alphas_cumprod, from_folder.schedule.alphas_cumprod)


def test_diffusers_reads_our_single_file_identically(folder, tmp_path):
    """diffusers' own original-checkpoint converter is an independent check of our key tables."""
    family, root = folder
    sd = load_sd(root, components=["unet", "vae", "text_encoder"])
    path = single_file_of(sd, tmp_path / "model.safetensors", openclip=family == "sd2")
    ref_unet = diffusers.UNet2DConditionModel.from_single_file(path, config=str(root), subfolder="unet", local_files_only=True)
    ref_vae = diffusers.AutoencoderKL.from_single_file(path, config=str(root), subfolder="vae", local_files_only=True)
    x, ctx = randn(1, 4, 8, 16, seed=12), randn(1, 5, UNETS[family].context_dim, seed=13)
    img = rand(1, 3, 32, 32, seed=14) * 2 - 1
    with torch.no_grad():
        assert rel_err(ref_unet(x, 10, ctx).sample, sd.unet(x, 10, ctx)) <= 1e-6
        assert rel_err(ref_vae.encode(img).latent_dist.mean * TINY_VAE.scaling_factor, sd.vae.encode(img)) <= 1e-6


def test_components_subset_and_dtypes(folder):
    _, root = folder
    sd = load_sd(root, components=["unet", "vae"], dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert sd.text_encoder is None and sd.tokenizer is None
    assert next(sd.unet.parameters()).dtype == torch.bfloat16
    assert next(sd.vae.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="encode_prompt needs"):
        sd.encode_prompt("x")


def test_single_file_reads_only_wanted_components(folder, tmp_path):
    family, root = folder
    path = single_file_of(load_sd(root), tmp_path / "model.safetensors", openclip=family == "sd2")
    sd = load_sd(path, components=["vae"], vae_dtype=torch.float64)
    assert sd.unet is None and sd.text_encoder is None and next(sd.vae.parameters()).dtype == torch.float64


def test_prediction_type_override(folder, tmp_path):
    family, root = folder
    path = single_file_of(load_sd(root, components=["unet", "vae", "text_encoder"]), tmp_path / "m.safetensors", family == "sd2")
    assert load_sd(path, components=[], prediction_type="epsilon").schedule.prediction_type == "epsilon"
    assert load_sd(root, components=[], prediction_type="sample").schedule.prediction_type == "sample"


@pytest.mark.parametrize(
    "unet, vae, text, openclip",
    [(SD15, SD_VAE, SD1_TEXT, False), (SD21, SD_VAE, SD2_TEXT, True)],
    ids=["sd15", "sd21"],
)
def test_full_size_configs_are_inferred_from_shapes(unet, vae, text, openclip):
    with torch.device("meta"):
        u, v, t = UNet(unet).state_dict(), AutoencoderKL(vae).state_dict(), CLIPTextEncoder(text).state_dict()
    unet_ldm, vae_ldm, text_ldm = ldm.split(ldm.to_ldm(u, v, t, unet, vae, openclip))
    assert ldm.infer_unet_config(unet_ldm, upcast_attention=unet.upcast_attention) == unet
    assert ldm.infer_vae_config(vae_ldm) == vae
    assert ldm.infer_text_config(text_ldm) == text
    if openclip:  # originals store all 24 OpenCLIP layers; SD uses 23
        assert len(ldm.indices(text_ldm, "model.transformer.resblocks.{}.ln_1.weight")) == 24


def test_ldm_round_trip_is_exact():
    torch.manual_seed(0)
    unet, vae = UNet(UNETS["sd2"]), AutoencoderKL(TINY_VAE)
    text = CLIPTextEncoder(TEXT["sd2"])
    u, v, t = ldm.split(ldm.to_ldm(unet.state_dict(), vae.state_dict(), text.state_dict(), UNETS["sd2"], TINY_VAE, True))
    for ours, back in [
        (unet.state_dict(), ldm.unet_from_ldm(u, UNETS["sd2"])),
        (vae.state_dict(), ldm.vae_from_ldm(v, TINY_VAE)),
        (text.state_dict(), ldm.text_from_ldm(t, TEXT["sd2"].layers)),
    ]:
        assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)


def test_unknown_original_key_is_named(folder, tmp_path):
    family, root = folder
    sd = load_sd(root, components=["unet", "vae", "text_encoder"])
    tensors = ldm.to_ldm(sd.unet.state_dict(), sd.vae.state_dict(), sd.text_encoder.state_dict(), sd.unet.config, sd.vae.config, family == "sd2")
    tensors["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(1)
    del tensors["model.diffusion_model.out.2.bias"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_sd(tmp_path / "bad.safetensors", components=["unet"])
    assert "conv_out.bias" in str(e.value) and "input_blocks.1.0.extra.weight" in str(e.value)


def test_hub_repo_id_loads_from_offline_cache(folder, tmp_path, monkeypatch):
    family, root = folder
    files = {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}
    fake_hub_cache(tmp_path / "cache", f"someone/tiny-{family}", files)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    sd, local = load_sd(f"someone/tiny-{family}"), load_sd(root)
    assert torch.equal(sd.tokenizer(PROMPTS), local.tokenizer(PROMPTS))
    assert all(torch.equal(a, b) for a, b in zip(sd.unet.state_dict().values(), local.unet.state_dict().values()))
    with pytest.raises(CheckpointError, match="not in the local cache"):
        load_sd("someone/never-downloaded")


def test_bad_sources_get_clear_errors(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="refusing a pickle"):
        load_sd(tmp_path / "model.ckpt")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_sd(tmp_path / "weights.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_sd(tmp_path / "empty")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors: corrupt"):
        load_sd(tmp_path / "broken.safetensors")
    save_file({"first_stage_model.x": torch.zeros(1)}, tmp_path / "vae_only.safetensors")
    with pytest.raises(CheckpointError, match="not an original-layout SD checkpoint"):
        load_sd(tmp_path / "vae_only.safetensors")
    with pytest.raises(ValueError, match="unknown components"):
        load_sd(tmp_path / "empty", components=["controlnet"])


def test_saved_components_load_in_reference_libraries_and_round_trip(folder, tmp_path):
    family, root = folder
    sd = load_sd(root)
    sd.unet.widen_conv_in(8)  # as a fine-tuned image+mask U-Net would be saved
    for name in ("unet", "vae", "text_encoder"):
        save_pretrained(getattr(sd, name), tmp_path / name)
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    ref_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    ref_text = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    x, ctx = randn(1, 8, 8, 8, seed=15), randn(1, 5, UNETS[family].context_dim, seed=16)
    img, ids = rand(1, 3, 16, 16, seed=17) * 2 - 1, sd.tokenizer(PROMPTS[:1])
    with torch.no_grad():
        assert rel_err(ref_unet(x, 10, ctx).sample, sd.unet(x, 10, ctx)) <= 1e-6
        assert rel_err(ref_vae.encode(img).latent_dist.mean * TINY_VAE.scaling_factor, sd.vae.encode(img)) <= 1e-6
        assert rel_err(ref_text(ids).last_hidden_state, sd.text_encoder(ids)) <= 1e-6
    for cls, name in ((UNet, "unet"), (AutoencoderKL, "vae"), (CLIPTextEncoder, "text_encoder")):
        back = from_pretrained(cls, tmp_path, subfolder=name)
        assert back.config == getattr(sd, name).config
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), getattr(sd, name).state_dict().values()))
    assert not list(tmp_path.rglob("*.tmp"))


def test_save_pretrained_round_trips_through_load_sd_and_the_reference_libraries(tmp_path):
    """A fine-tuned SD with a support conv_in (DiffewS) written by `save_pretrained`: `load_sd`
    gives the same networks (support rows included); diffusers' U-Net reads the folder, ignoring
    only conv_in_support, and equals ours on query rows; transformers reads the text encoder and
    the tokenizer; the VAE likewise."""
    from unet_seg.demo import BlockCodec
    from unet_seg.diffusion import NoiseSchedule
    from unet_seg.models.tokenizer import CLIPTokenizer
    from unet_seg.sd import StableDiffusion

    torch.manual_seed(0)
    unet = perturb_(UNet(UNETS["sd2"]), 1).add_support_conv_in(8)
    sd = StableDiffusion(unet, perturb_(AutoencoderKL(TINY_VAE), 2), perturb_(CLIPTextEncoder(TEXT["sd2"]), 3),
                         CLIPTokenizer.from_bpe(pad_token="!"), NoiseSchedule.sd("v_prediction"), source="test")  # fmt: skip
    folder = sd.save_pretrained(tmp_path / "model", readme="# fine-tuned\n")
    assert (folder / "README.md").read_text() == "# fine-tuned\n" and not list(tmp_path.glob(".*"))  # no temporaries left
    back = load_sd(folder)
    assert back.schedule.prediction_type == "v_prediction"
    x, t = randn(3, 8, 16, 16, seed=4), torch.tensor([1, 1, 500])
    context = sd.encode_prompt(PROMPTS)
    support = torch.tensor([False, True, True])
    assert torch.equal(back.encode_prompt(PROMPTS), context)
    assert torch.equal(back.unet(x, t, context, support=support), unet(x, t, context, support=support))
    image = rand(1, 3, 32, 32, seed=5) * 2 - 1
    assert torch.equal(back.vae.encode(image), sd.vae.encode(image))

    ref = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    ours = unet(x[:1, :4], t[:1], context[:1])
    with torch.no_grad():
        err = rel_err(ref(x[:1, :4], t[:1], context[:1]).sample, ours)
    assert err <= 1e-4, err  # measured 0.0 (same weights, fp32)
    assert set(unet.state_dict()) - set(ref.state_dict()) == {"conv_in_support.weight", "conv_in_support.bias"}
    ids = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")(PROMPTS, padding="max_length", max_length=77).input_ids
    assert torch.equal(torch.tensor(ids), sd.tokenizer(PROMPTS))
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        assert rel_err(text(sd.tokenizer(PROMPTS)).last_hidden_state, context) <= 1e-4

    sd.vae = BlockCodec()  # the demos' weight-free codec: listed as null, not written
    demo = sd.save_pretrained(tmp_path / "demo")
    assert json.loads((demo / "model_index.json").read_text())["vae"] == [None, None] and not (demo / "vae").exists()
    assert load_sd(demo, components=["unet"]).unet.config.support_in_channels == 8
