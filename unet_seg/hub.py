"""Where weights come from: a hub repo id or a local diffusers-layout folder -> config + state dict.

Safetensors only: pickle-based files (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused, because
loading them runs arbitrary code. Models are built on the `meta` device and take the loaded
tensors by assignment, so a checkpoint is held in memory once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar, Union

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError
from .files import atomic_path, write_json

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
FILE_SUFFIXES = (".safetensors", ".json", ".onnx", ".gguf", *PICKLE_SUFFIXES)  # a source ending so is a path
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # unet/, vae/
TRANSFORMERS_WEIGHTS = "model"  # text_encoder/

OFFLINE = "the hub cannot be reached (offline or HF_HUB_OFFLINE=1): download it once with network access"

M = TypeVar("M", bound=nn.Module)


def refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a pickle-based checkpoint. Unpickling runs arbitrary code; "
            "convert it to .safetensors (e.g. with the `safetensors` package in a trusted environment)."
        )


def weight_filenames(weights_name: str, variant: Optional[str]) -> tuple[str, str]:
    """(single file, sharded index) names, e.g. `diffusion_pytorch_model.fp16.safetensors`."""
    stem = f"{weights_name}.{variant}" if variant else weights_name
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def component_files(
    src: Union[str, os.PathLike],
    subfolder: str,
    weights_name: str,
    *,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
) -> tuple[dict, list[Path]]:
    """Config dict and safetensors files of one component (`unet`, `vae`, `text_encoder`).

    `src` is a local folder in the diffusers layout (the component in `src/subfolder`, or `src`
    itself when it holds the component's config.json), or a hub repo id. From the hub only
    the config and the weight files are downloaded (cached; set HF_HUB_OFFLINE=1 to use the
    cache only); `revision` pins a branch, tag or commit.
    """
    source = local_or_repo_id(src)
    if isinstance(source, str):
        return _hub_component(source, subfolder, weights_name, revision, variant)
    if source.is_dir():
        return _local_component(source, subfolder, weights_name, variant)
    raise CheckpointError(f"{src}: a file, not a diffusers folder (single-file checkpoints: `unet_seg.load_sd`)")


def looks_like_repo_id(src: str) -> bool:
    """`name` or `org/name`, as the hub spells them; anything path-like is not: a leading `.`, `/`
    or `~`, a backslash, more than one slash, a file suffix (`.safetensors`, `.ckpt`, ...), or a
    first part that exists here as a folder (`runs/model` beside a `runs/`)."""
    parts = src.split("/")
    return (
        0 < len(parts) <= 2
        and all(parts)
        and not src.startswith((".", "~"))
        and "\\" not in src
        and not src.lower().endswith(FILE_SUFFIXES)
        and not (len(parts) == 2 and Path(parts[0]).exists())
    )


def local_or_repo_id(src: Union[str, os.PathLike]) -> Union[Path, str]:
    """An existing local file or folder as a Path, else a hub repo id as a str. A mistyped path
    (a `Path` object, or a string that `looks_like_repo_id` rejects) fails here at once with
    "no such file or folder", instead of going to the hub."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if isinstance(src, os.PathLike) or not looks_like_repo_id(str(src)):
        raise CheckpointError(f"no such file or folder: {src}")
    return str(src)


def _hub_error(repo_id: str, what: str) -> CheckpointError:
    """A hub failure for a string that was not a local path either: say both."""
    return CheckpointError(f"no local folder {repo_id!r}, and hub repo {what}")


def _local_component(root: Path, subfolder: str, weights_name: str, variant: Optional[str]) -> tuple[dict, list[Path]]:
    folder = root / subfolder if subfolder and (root / subfolder).is_dir() else root
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{root}: no {subfolder + '/' if subfolder else ''}config.json (diffusers layout expected)")
    single, index = weight_filenames(weights_name, variant)
    if (folder / single).is_file():
        files = [folder / single]
    elif (folder / index).is_file():
        files = [folder / name for name in _shard_names(folder / index)]
    else:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            refuse_pickle(folder / pickled[0])
        raise CheckpointError(f"{folder}: neither {single} nor {index} found")
    return read_json(config), files


def _hub_component(
    repo_id: str, subfolder: str, weights_name: str, revision: Optional[str], variant: Optional[str]
) -> tuple[dict, list[Path]]:
    def fetch(filename: str) -> Path:
        return download(repo_id, filename, subfolder=subfolder or None, revision=revision)

    where = f"{repo_id}{'/' + subfolder if subfolder else ''}" + (f" @ {revision}" if revision else "")
    try:
        config = fetch("config.json")
    except RepositoryNotFoundError as e:
        raise _hub_error(repo_id, f"{repo_id!r} was not found (or is private without a token)") from e
    except LocalEntryNotFoundError as e:
        raise _hub_error(repo_id, f"{where}/config.json is not in the local cache and {OFFLINE}") from e
    except EntryNotFoundError as e:
        raise _hub_error(repo_id, f"{where} has no config.json") from e
    except HfHubHTTPError as e:
        raise _hub_error(repo_id, f"{where} is unreachable ({e})") from e
    single, index = weight_filenames(weights_name, variant)
    for name in (single, index):
        try:
            path = fetch(name)
        except EntryNotFoundError:  # includes: not cached while offline
            continue
        if name == single:
            return read_json(config), [path]
        return read_json(config), [fetch(shard) for shard in _shard_names(path)]
    raise _hub_error(
        repo_id,
        f"{where}: neither {single} nor {index} could be found on the hub or in the cache "
        "(pickle .bin weights are not loaded; offline, only cached files are seen)"
    )


def download(repo_id: str, filename: str, *, subfolder: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """`hf_hub_download`, except that a file neither in the cache nor reachable fails after one
    try (LocalEntryNotFoundError, at most HF_HUB_ETAG_TIMEOUT seconds) instead of after
    huggingface_hub's retries, which wait half a minute or more in silence before the same answer."""
    cached = try_to_load_from_cache(repo_id, f"{subfolder}/{filename}" if subfolder else filename, revision=revision)
    if cached is None and not hub_constants.HF_HUB_OFFLINE:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, subfolder=subfolder, revision=revision))
        except HfHubHTTPError:
            pass  # the hub answered: hf_hub_download says what (no such repo or file, a token needed, ...)
        except Exception as e:  # no answer: no network, no DNS, a timeout
            raise LocalEntryNotFoundError(f"{repo_id}: the hub did not answer ({type(e).__name__}: {e})") from e
    return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision))


def fetch_files(
    src: Union[str, os.PathLike], subfolder: str, required: list[str], optional: tuple[str, ...] = (), *, revision=None
) -> Path:
    """A local folder holding `subfolder`'s files (downloaded and cached for a hub repo id)."""
    source = local_or_repo_id(src)
    if isinstance(source, Path):
        folder = source / subfolder
        missing = [name for name in required if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: missing {', '.join(missing)}")
        return folder
    folder = None
    for name in [*required, *optional]:
        try:
            folder = download(source, name, subfolder=subfolder, revision=revision).parent
        except RepositoryNotFoundError as e:
            raise _hub_error(source, f"{source!r} was not found (or is private without a token)") from e
        except LocalEntryNotFoundError as e:
            if name in required:
                raise _hub_error(source, f"{source}/{subfolder}/{name} is not in the local cache and {OFFLINE}") from e
        except EntryNotFoundError as e:
            if name in required:
                raise _hub_error(source, f"{source}/{subfolder}/{name} does not exist") from e
        except HfHubHTTPError as e:
            raise _hub_error(source, f"{source} is unreachable ({e})") from e
    return folder


def _shard_names(index: Path) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no `weight_map` of tensor name -> shard file")
    return sorted(set(weight_map.values()))


def read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else raises CheckpointError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(
    files: list[Path],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    keep: Optional[Callable[[str], bool]] = None,
) -> dict[str, Tensor]:
    """The tensors of one or several safetensors files (those whose key `keep` accepts);
    floating tensors cast to `dtype` (default float32) one at a time, so peak memory stays
    near one copy of the weights."""
    dtype = dtype or torch.float32
    device = str(device or "cpu")
    out: dict[str, Tensor] = {}
    for path in files:
        refuse_pickle(path)
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                for key in f.keys():
                    if keep is not None and not keep(key):
                        continue
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if t.is_floating_point() else t
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    return out


def load_model(
    make_model: Callable[[dict], M],
    src: Union[str, os.PathLike],
    *,
    subfolder: str,
    weights_name: str,
    revision: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    variant: Optional[str] = None,
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda sd: sd,
) -> M:
    """`make_model(config dict)` with the component's weights (renamed by `convert`) loaded."""
    config, files = component_files(src, subfolder, weights_name, revision=revision, variant=variant)
    state_dict = convert(read_safetensors(files, dtype=dtype, device=device))
    return build_with_weights(lambda: make_model(config), state_dict, " + ".join(map(str, files)), config_file=files[0].parent / "config.json")


def clip_text_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text-encoder keys as published (`text_model.` prefix; transformers 5 saves without
    it), less `position_ids`, a buffer that transformers before 4.31 saved and we compute."""
    return {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items() if not k.endswith("position_ids")
    }


def save_component(state_dict: dict[str, Tensor], config: dict, folder: Union[str, os.PathLike], weights_name: str) -> Path:
    """Write one component in the hub layout: `folder/config.json` and `folder/<weights_name>.safetensors`
    (each written atomically), loadable by our `from_pretrained` and by diffusers / transformers."""
    folder = Path(folder)
    with atomic_path(folder / f"{weights_name}.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(tmp))
    write_json(folder / "config.json", config)
    return folder


def read_shapes(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as an empty `meta` tensor of its shape: the header only."""
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def build_with_weights(
    make_model: Callable[[], M], state_dict: dict[str, Tensor], source: str, config_file: Optional[Path] = None
) -> M:
    """`make_model()` on the meta device, then take `state_dict` by assignment (no copy).

    A state dict that does not fit raises `CheckpointError` naming the missing and unexpected
    keys, the shape mismatches and non-floating tensors where the model has floating ones; a
    configuration the model cannot be built from (`config_file`, or shapes inferred from
    `source`) raises it too.
    """
    try:
        with torch.device("meta"):
            model = make_model()
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{config_file or source}: the model cannot be built from it ({type(e).__name__}: {e})") from e
    check_state_dict(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def weights_fingerprint(tensors: Mapping[str, Tensor], label: str = "") -> str:
    """sha256 of `label`, then of each tensor in name order: its name, dtype, shape and bytes.
    Another checkpoint, or the same one cast to another dtype, has another one; the device and
    the memory layout (contiguous or not) do not change it. `label` tells kinds apart (a class name)."""
    h = hashlib.sha256(label.encode())
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_state_dict(expected: dict[str, Tensor], state_dict: dict[str, Tensor], source: str) -> None:
    """CheckpointError unless `state_dict` has exactly `expected`'s keys (tensors, e.g. a model's
    state dict on the meta device), each of the same shape, floating where expected is floating."""
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    common = sorted(expected.keys() & state_dict.keys())
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if state_dict[k].shape != expected[k].shape
    ]
    dtypes = [
        f"{k}: checkpoint {state_dict[k].dtype} vs model {expected[k].dtype}"
        for k in common
        if expected[k].is_floating_point() != state_dict[k].is_floating_point()
    ]
    if missing or unexpected or shapes or dtypes:

        def listing(title: str, items: list[str]) -> str:
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more if items else ""

        raise CheckpointError(
            f"{source} does not fit the model:"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", shapes)
            + listing("dtype mismatches", dtypes)
        )
