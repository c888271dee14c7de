"""Bad sources fail at once with a CheckpointError naming the file (and key): mistyped paths,
truncated / reshaped / retyped / pickled weight files, configs and tokenizer files (hypothesis fuzz).

The checkpoints are written by our own models (no reference library needed): a diffusers-layout
folder and an original-layout single file of a tiny SD1 with a 64-wide-head text encoder.
"""

import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import unet_seg.hub
from unet_seg import ldm
from unet_seg.hub import CheckpointError
from unet_seg.models import TINY_SD1, TINY_VAE, AutoencoderKL, CLIPTextConfig, CLIPTextEncoder, UNet
from unet_seg.pretrained import from_pretrained, save_pretrained
from unet_seg.sd import load_sd

from .helpers import write_tokenizer

TEXT = CLIPTextConfig(vocab_size=49408, width=64, layers=2, heads=1, mlp_dim=128, act="quick_gelu")
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
JSON_FILES = [
    "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
    "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
]  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """root/folder: a diffusers-layout tiny SD1; root/single.safetensors: the same in the original layout."""
    root = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    unet, vae = UNet(replace(TINY_SD1, context_dim=64)), AutoencoderKL(TINY_VAE)
    text = CLIPTextEncoder(TEXT)
    folder = root / "folder"
    save_pretrained(unet, folder / "unet")
    save_pretrained(vae, folder / "vae")
    save_pretrained(text, folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    single = ldm.to_ldm(unet.state_dict(), vae.state_dict(), text.state_dict(), unet.config, vae.config, openclip=False)
    save_file({k: v.contiguous() for k, v in single.items()}, root / "single.safetensors")
    load_sd(folder), load_sd(root / "single.safetensors")  # both load as written
    return root


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"asked the hub for {args}")

    monkeypatch.setattr(unet_seg.hub, "hf_hub_download", refuse)


# ---------------------------------------------------------------- paths and repo ids


@pytest.mark.parametrize(
    "src", ["./typo_folder", "/nonexistent/folder", "missing.safetensors", "old.ckpt", "~/no_such_model", "a/b/c", "runs/model"]
)
def test_mistyped_paths_fail_at_once_without_asking_the_hub(src, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/model": its first part exists here, so it is a path
    with pytest.raises(CheckpointError, match=f"no such file or folder: {src}$"):
        load_sd(src)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_sd(tmp_path / "folder_as_path_object")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        from_pretrained(UNet, src)


def test_a_repo_id_that_is_neither_local_nor_cached_says_both(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for call in (lambda: load_sd("someone/not-here"), lambda: from_pretrained(UNet, "someone/not-here")):
        with pytest.raises(CheckpointError, match="no local folder 'someone/not-here', and hub repo .*not in the local cache"):
            call()


@pytest.mark.parametrize("hub", ["refuses connections", "drops connections"])
def test_an_unreachable_hub_is_reported_after_one_try_not_after_retries(hub, tmp_path):
    """Online, no network: for a file that is not cached huggingface_hub retries five times
    ("Retrying in 8s [Retry 5/5]", half a minute) or lets the connection error through as a
    traceback; the loaders ask once and say the hub cannot be reached."""
    import socket
    import subprocess
    import sys
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port, connections = server.getsockname()[1], []
    if hub == "refuses connections":
        server.close()
    else:

        def drop():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                connections.append(1)
                conn.close()

        threading.Thread(target=drop, daemon=True).start()
    code = (
        "from unet_seg import CheckpointError\nfrom unet_seg.models import UNet\nfrom unet_seg.pretrained import from_pretrained\n"
        "try:\n    from_pretrained(UNet, 'someone/sd', subfolder='unet')\n"
        "except CheckpointError as e:\n    print(e)"
    )
    env = {
        **os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }  # fmt: skip
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.close()
    assert "someone/sd/unet/config.json is not in the local cache and the hub cannot be reached" in run.stdout, run.stderr
    assert "Retry" not in run.stderr and len(connections) <= 2  # one request (httpx reconnects once when dropped)


# ---------------------------------------------------------------- single files


def test_single_file_missing_a_tensor_of_the_architecture_names_file_and_full_key(pristine, tmp_path):
    tensors = load_file(pristine / "single.safetensors")
    del tensors["model.diffusion_model.out.2.weight"]
    save_file(tensors, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut.safetensors: no tensor model\.diffusion_model\.out\.2\.weight"):
        load_sd(tmp_path / "cut.safetensors")
    tensors = load_file(pristine / "single.safetensors")
    del tensors["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(tensors, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut.safetensors: no tensor cond_stage_model\..*layers\.0\.mlp\.fc1\.weight"):
        load_sd(tmp_path / "cut.safetensors", components=["text_encoder"])



@pytest.mark.parametrize(
    "key, components",
    [
        ("model.diffusion_model.out.2.weight", ["unet"]),
        ("first_stage_model.encoder.down.0.block.0.conv2.weight", ["vae"]),  # once: "num_channels must be divisible"
        ("first_stage_model.encoder.conv_in.weight", ["vae"]),  # once: "tuple index out of range"
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", ["text_encoder"]),
    ],
)
def test_single_file_with_an_architecture_tensor_of_the_wrong_rank_names_it(pristine, tmp_path, key, components):
    tensors = load_file(pristine / "single.safetensors")
    tensors[key] = torch.zeros(tensors[key].numel() + 1)  # found by the fuzz test below
    save_file(tensors, tmp_path / "flat.safetensors")
    name = key.split(".", 1)[1].removeprefix("diffusion_model.").removeprefix("transformer.")
    with pytest.raises(CheckpointError, match=rf"flat.safetensors: .*tensor {re.escape(name)} has shape \[\d+\], expected [24] dim"):
        load_sd(tmp_path / "flat.safetensors", components=components)

def test_wrong_dtype_is_named(pristine, tmp_path):
    tensors = load_file(pristine / "single.safetensors")
    key = "model.diffusion_model.out.2.bias"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, tmp_path / "ints.safetensors")
    with pytest.raises(CheckpointError, match=r"ints.safetensors \(U-Net\)[\s\S]*dtype mismatches[\s\S]*conv_out.bias: checkpoint torch.int32"):
        load_sd(tmp_path / "ints.safetensors")


# ---------------------------------------------------------------- fuzz

MARKER = Path(tempfile.gettempdir()) / "unet_seg_fuzz_pickle_ran"


class Payload:
    """Unpickling this would create MARKER: proof that a loader executed code."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


PICKLE = pickle.dumps({"state_dict": Payload()})

# Every place a weight file can be: pickle bytes under the expected name, or under a pickle name
# instead of the safetensors file (the second element: the file it replaces); single files too.
PICKLE_PLACES = [
    *((rel, None) for rel in [*WEIGHTS.values(), *JSON_FILES, "single.safetensors"]),
    ("unet/diffusion_pytorch_model.bin", WEIGHTS["unet"]), ("vae/diffusion_pytorch_model.bin", WEIGHTS["vae"]),
    ("text_encoder/pytorch_model.bin", WEIGHTS["text_encoder"]), ("single.ckpt", None),
]  # fmt: skip


def _copy(pristine: Path, into: Path) -> Path:
    shutil.copytree(pristine / "folder", into / "folder")
    shutil.copy(pristine / "single.safetensors", into / "single.safetensors")
    return into


def _load(root: Path, rel: str):
    return load_sd(root / rel) if rel.startswith("single") else load_sd(root / "folder")


def _file(root: Path, rel: str) -> Path:
    return root / rel if rel.startswith("single") else root / "folder" / rel


def _check_error(error: CheckpointError, path: Path, key: str = "") -> None:
    message = str(error)
    assert str(path) in message or (path.parent.name in message and path.name in message), message
    assert key in message, message


@settings(max_examples=12, deadline=None)
@given(rel=st.sampled_from([*WEIGHTS.values(), *JSON_FILES, "single.safetensors"]), fraction=st.floats(0, 0.999))
def test_fuzz_truncated_files(pristine, rel, fraction):
    with tempfile.TemporaryDirectory() as tmp:
        root = _copy(pristine, Path(tmp))
        path = _file(root, rel)
        data = path.read_bytes()
        path.write_bytes(data[: min(int(len(data) * fraction), len(data) - 2)])  # at least "}\n" goes
        with pytest.raises(CheckpointError) as e:
            _load(root, rel)
        _check_error(e.value, path)


@settings(max_examples=16, deadline=None)
@given(
    rel=st.sampled_from([*WEIGHTS.values(), "single.safetensors"]),
    change=st.sampled_from(["drop", "add", "reshape", "int", "bool"]),
    pick=st.integers(0, 10**6),
)
def test_fuzz_missing_unexpected_reshaped_and_retyped_tensors(pristine, rel, change, pick):
    with tempfile.TemporaryDirectory() as tmp:
        root = _copy(pristine, Path(tmp))
        path = _file(root, rel)
        tensors = load_file(path)
        key = sorted(tensors)[pick % len(tensors)]
        if change == "drop":
            del tensors[key]
        elif change == "add":
            key = key + "_extra"
            tensors[key] = torch.zeros(3)
        elif change == "reshape":
            tensors[key] = torch.zeros(tensors[key].numel() + 1)
        else:
            tensors[key] = tensors[key].to(torch.int64 if change == "int" else torch.bool)
        save_file(tensors, path)
        with pytest.raises(CheckpointError) as e:
            _load(root, rel)
        # the message names the file and the key (ours after renaming, so only its last parts)
        _check_error(e.value, path, ".".join(key.split(".")[-1:]))


@settings(max_examples=12, deadline=None)
@given(place=st.sampled_from(PICKLE_PLACES))
def test_fuzz_pickles_anywhere_are_refused_and_never_run(pristine, place):
    rel, replaces = place
    MARKER.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = _copy(pristine, Path(tmp))
        path = _file(root, rel)
        if replaces:
            _file(root, replaces).unlink()
        path.write_bytes(PICKLE)
        with pytest.raises(CheckpointError) as e:
            _load(root, rel)
        _check_error(e.value, path)
    assert not MARKER.exists(), "a loader unpickled the payload"


def test_a_network_without_a_hub_layout_is_refused_by_name(tmp_path):
    """`HUB_LAYOUT` lists the networks with a hub folder layout; others (a CLIP tower with its own
    loader, any module) get a TypeError naming the ones that have one, before any file is touched."""
    from torch import nn

    from unet_seg.models.clip import CLIPTextEncoderWithProjection

    for call in (lambda: from_pretrained(CLIPTextEncoderWithProjection, tmp_path / "nowhere"), lambda: save_pretrained(nn.Linear(2, 2), tmp_path / "x")):
        with pytest.raises(TypeError, match="has no hub layout; these do: UNet, AutoencoderKL, CLIPTextEncoder"):
            call()
    assert not (tmp_path / "x").exists()
