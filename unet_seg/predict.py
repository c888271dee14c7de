"""Using a trained recipe: its exported model, your own images in, label PNGs and overlays out.

    predictor = recipe.load_trained("runs/diff")       # a run folder (its model/) or a model/ folder
    labels = predictor("street.jpg")                   # [H, W] class ids at the photo's own size
    write_prediction("out", "street", read_image("street.jpg"), labels, predictor.palette)

An export (`save_export`) is a folder: `config.json` (the recipe, its settings, the class names and
palette, the frozen model's id), `model.safetensors` (the trained tensors), and for demos, whose
frozen models are random and cannot be fetched by id, the tiny SD beside them in `sd/`. Images are
read in any size and mode (grey, RGBA, palette, 16-bit; JPEG orientation applied); a mask must be
a mask (0/255 or 0/1), or `InputError` says what it holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError, InputError
from .files import atomic_folder, write_json
from .hub import refuse_pickle
from .models.vae import AutoencoderKL
from .viz import IGNORE_GREY, PALETTE

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
EXPORT = "model"  # RUN/model/


# ---------------------------------------------------------------------------------------------
# Inputs


def _open(path: PathLike) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    return ImageOps.exif_transpose(img)  # phone photos: the orientation they are shown in


def read_image(path: PathLike) -> Tensor:
    """An image file of any size and mode -> [3, H, W] float32 in [-1, 1]: grey replicated, 16-bit
    and float images scaled to their range, transparency composited over white."""
    img = _open(path)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255
        img = Image.fromarray(a.round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1


def read_mask(path: PathLike) -> Tensor:
    """A binary mask file (0 and 255, or 0 and 1; grey, palette or equal RGB channels) -> long
    [H, W] in {0, 1}. Anything else -> `InputError`, which says what the file holds."""
    img = _open(path)
    a = np.asarray(img.convert("RGB") if img.mode not in ("1", "L", "P", "I", "I;16") else img)
    if a.ndim == 3:
        if not (a == a[..., :1]).all():
            raise InputError(f"{path}: not a mask: its colour channels differ (a mask is black and white, 0 and 255)")
        a = a[..., 0]
    a = a.astype(np.int64)
    values = np.unique(a)
    top = 1 if set(values.tolist()) <= {0, 1} else 255
    if not set(values.tolist()) <= {0, top}:
        hint = " (JPEG compression blurs masks: save masks as PNG)" if Path(path).suffix.lower() in (".jpg", ".jpeg") else ""
        shown = ", ".join(map(str, values[:6].tolist())) + (", ..." if len(values) > 6 else "")
        raise InputError(f"{path}: not a mask: it holds {len(values)} values ({shown}); a mask holds 0 and 255 (or 0 and 1){hint}")
    if not (a > 0).any():
        raise InputError(f"{path}: the mask is empty (all 0): mark the object in white (255)")
    return torch.from_numpy((a > 0).astype(np.int64))


def image_files(inputs: Iterable[PathLike]) -> list[tuple[Path, Path]]:
    """Files and folders -> [(image file, output path without suffix)]: a folder's images (by
    suffix, recursively, sorted) keep their path below it; two inputs that would write the same
    output, or an input that is neither, are an `InputError`."""
    found: dict[Path, Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"{item}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            pairs = [(p, p.relative_to(item).with_suffix("")) for p in files]
        elif item.is_file():
            pairs = [(item, Path(item.stem))]
        else:
            raise InputError(f"{item}: no such file or folder")
        for path, out in pairs:
            if out in found and found[out] != path:
                raise InputError(f"{found[out]} and {path} would both write {out}.png: predict them into different --out folders")
            found[out] = path
    return [(p, o) for o, p in found.items()]


def evaluation_input(image: Tensor, resize: dict) -> Tensor:
    """[3, H, W] -> the image a recipe's evaluation sees: `{"square": S}` squashes it to S × S
    (synthetic test sets are drawn at that size); `{"scale": (long, short)}` is the driving test
    sets' `data.transforms.ResizeImage(scale)` (the aspect kept, sides multiples of 8)."""
    if "square" in resize:
        return resize_image(image, (resize["square"],) * 2)
    from .data.transforms import ResizeImage

    return ResizeImage(tuple(resize["scale"]))(image, image.new_zeros(image.shape[-2:]), None)[0]


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[3, H, W] -> [3, *size], bilinear with antialiasing (as the datasets resize), clamped to [-1, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1)


def support_pairs(supports: Sequence[tuple], size: tuple[int, int]) -> tuple[list[Tensor], list[Tensor]]:
    """Few-shot supports [(image, mask), ...] (paths, or [3, H, W] in [-1, 1] and [H, W] in {0, 1})
    -> (images `[3, *size]`, masks `[*size]`) resized as COCO-20i's episodes (bilinear, nearest)."""
    if not supports:
        raise InputError("few-shot segmentation segments what its supports show: give at least one (image, mask) pair")
    images, masks = [], []
    for image, mask in supports:
        image = read_image(image) if isinstance(image, (str, os.PathLike)) else image
        mask = read_mask(mask) if isinstance(mask, (str, os.PathLike)) else mask.long()
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise InputError(f"support mask {tuple(mask.shape)} and its image {tuple(image.shape[-2:])} differ in size (H, W)")
        images.append(resize_image(image, size))
        masks.append(F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long())
    return images, masks


# ---------------------------------------------------------------------------------------------
# Outputs


def palette_for(num_classes: int, palette: Optional[Sequence] = None, background: bool = False) -> np.ndarray:
    """uint8 [K, 3]: the dataset's colours, or `viz.PALETTE`'s: black for class 0 when it is a
    `background`, else its saturated colours from colour 1 on (ADE20K's class 0 is "wall")."""
    if palette is not None:
        return np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return PALETTE[: num_classes].copy() if background else PALETTE[1 : num_classes + 1].copy()


def blend(image: Tensor, labels: Tensor, palette: np.ndarray, untinted: Optional[int] = None, alpha: float = 0.5) -> np.ndarray:
    """image [3, H, W] in [-1, 1], labels [H, W] -> uint8 [H, W, 3]: each pixel blended with its
    class colour (label 255, or one past the palette, grey), pixels of class `untinted` left as they are."""
    rgb = ((image.detach().float().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy()
    lab = labels.detach().cpu().long().numpy()
    colours = np.full((256, 3), IGNORE_GREY, np.float64)
    colours[: len(palette)] = palette
    out = (1 - alpha) * rgb + alpha * colours[np.clip(lab, 0, 255)]
    if untinted is not None:
        out = np.where((lab == untinted)[..., None], rgb, out)
    return out.round().astype(np.uint8)


def write_prediction(out: PathLike, name: PathLike, image: Tensor, labels: Tensor, palette: np.ndarray,
                     binary: bool = False, untinted: Optional[int] = None) -> tuple[Path, Path]:  # fmt: skip
    """Write `out/name.png` (binary: a 0/255 grey mask; else the class ids, an 8-bit palette PNG
    with the dataset's colours) and `out/name_overlay.png` (the image tinted by class)."""
    path = Path(out) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    lab = labels.detach().cpu().numpy().astype(np.uint8)
    if binary:
        Image.fromarray(lab * 255, mode="L").save(path)
    else:
        png = Image.fromarray(lab, mode="P")
        colours = np.zeros((256, 3), np.uint8)
        colours[: len(palette)] = palette
        colours[255] = IGNORE_GREY
        png.putpalette(colours.flatten().tolist())
        png.save(path)
    over = path.with_name(f"{path.stem}_overlay.png")
    Image.fromarray(blend(image, labels, palette, untinted)).save(over)
    return path, over


def summary(labels: Tensor, class_names: Sequence[str], binary: bool = False, top: int = 4) -> str:
    """"foreground 23.4%" or the largest classes' shares, "road 41.2%, car 12.0%, ..."."""
    if binary:
        return f"foreground {100 * labels.float().mean().item():.1f}%"
    ids, counts = labels.flatten().unique(return_counts=True)
    order = counts.argsort(descending=True)[:top]
    name = lambda c: class_names[c] if c < len(class_names) else ("ignore" if c == 255 else str(c))  # noqa: E731
    return ", ".join(f"{name(int(ids[i]))} {100 * counts[i].item() / labels.numel():.1f}%" for i in order)


@dataclass
class Predictor:
    """A trained model as a function: `predictor(image, **kw) -> labels [H, W]` (long; DiffewS: a
    0/1 mask) at the image's own size; `image` a path or [3, H, W] in [-1, 1]. `class_names[i]`,
    `palette[i]` (uint8 [K, 3]) name and colour label i; `untinted`: the label overlays leave alone."""

    segment: Callable[..., Tensor]
    class_names: Sequence[str]
    palette: np.ndarray
    binary: bool = False
    untinted: Optional[int] = None
    config: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)  # the networks it runs, by name

    def __call__(self, image: Union[PathLike, Tensor], **kwargs) -> Tensor:
        return self.segment(read_image(image) if isinstance(image, (str, os.PathLike)) else image, **kwargs)


def logits_predictor(logits: Callable[[Tensor], Tensor], config: dict, modules: dict, device="cpu", untinted=None) -> Predictor:
    """A semantic predictor as the recipes evaluate: image [3, H, W] resized by `evaluation_input`
    (config["resize"]), `logits(images [1, 3, h, w]) -> [1, K, h', w']` on `device`, bilinear to
    (H, W), argmax. config["class_names"], config["palette"] (None: `viz.PALETTE`'s) name the classes."""

    @torch.no_grad()
    def segment(image: Tensor) -> Tensor:
        x = evaluation_input(image, config["resize"])[None].to(device)
        out = logits(x)
        return F.interpolate(out.float(), size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False).argmax(1)[0].cpu()

    names = config["class_names"]
    return Predictor(segment, names, palette_for(len(names), config.get("palette"), untinted == 0), untinted=untinted, config=config, modules=modules)


def predict_files(predictor: Predictor, inputs: Sequence[PathLike], out: PathLike, **kwargs) -> list[Path]:
    """Segment every image of `inputs` (files, folders), write each one's PNG and overlay under
    `out`, and print one line per image; -> the PNGs written."""
    files = image_files(inputs)
    written = []
    for path, name in files:
        image = read_image(path)
        labels = predictor(image, **kwargs)
        png, over = write_prediction(out, name, image, labels, predictor.palette, predictor.binary, predictor.untinted)
        h, w = image.shape[-2:]
        print(f"{path} ({w}x{h}) -> {png} ({summary(labels, predictor.class_names, predictor.binary)}), {over.name}", flush=True)
        written.append(png)
    return written


# ---------------------------------------------------------------------------------------------
# Exports: config.json + model.safetensors (+ sd/ for demos)


def default_device(device=None) -> torch.device:
    """`device`, or the GPU where there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def export_folder(run: PathLike) -> Path:
    """A run folder (holding model/) or a model/ folder itself -> the export folder, checked."""
    run = Path(run)
    folder = run if (run / "config.json").is_file() else run / EXPORT
    if not (folder / "config.json").is_file():
        what = "no such folder" if not run.exists() else f"no {EXPORT}/config.json: export it with the training flags and --export"
        raise CheckpointError(f"{run}: {what}")
    return folder


def save_export(folder: PathLike, config: dict, tensors: dict[str, Tensor], sd=None, args=None, readme: Optional[str] = None) -> Path:
    """Write an export atomically (rank 0 only; others return at once): `config.json` (with the
    run's command-line `args` as config["args"], what rebuilds the model), `model.safetensors`
    (`tensors`), and `sd/` (a `StableDiffusion` saved with `save_pretrained`, for demos, whose
    frozen models cannot be fetched by id) -> the folder."""
    from .train import is_main, print0

    if not is_main():
        return Path(folder)
    if args is not None:
        plain = lambda v: isinstance(v, (str, int, float, bool, type(None))) or (isinstance(v, (list, tuple)) and all(map(plain, v)))  # noqa: E731
        config = {**config, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if plain(v) or isinstance(v, Path)}}
    for key in ("model", "clip"):  # a local folder trained from: its absolute path
        if isinstance(config.get(key), str) and Path(config[key]).exists():
            config = {**config, key: str(Path(config[key]).resolve())}
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", config)
        if sd is not None:
            sd.save_pretrained(tmp / "sd")
        if readme:
            (tmp / "README.md").write_text(readme)
    print0(f"exported the trained model to {folder}")
    return Path(folder)


def export_sd(sd, folder: PathLike, config: dict) -> Path:
    """A fine-tuned SD as a diffusers folder (`StableDiffusion.save_pretrained`) with the recipe's
    `config.json` beside model_index.json and a README.md saying how to read it."""
    vae = "" if isinstance(sd.vae, AutoencoderKL) else (
        "\nNo vae/: the demo's VAE is the weight-free block codec (`unet_seg.demo.BlockCodec`).")
    folder = sd.save_pretrained(folder, readme=SD_README.format(recipe=config["recipe"], vae=vae))
    write_json(folder / "config.json", config)
    return folder


SD_README = """# {recipe}: fine-tuned Stable Diffusion (diffusers layout)

`unet_seg.load_sd` reads this folder whole. A U-Net with `support_in_channels` in unet/config.json
has a second input convolution for support rows, `conv_in_support` (few-shot: [image latent; mask
latent]); diffusers' UNet2DConditionModel loads the U-Net without it (it warns about those two
tensors and that config key) and runs the query path.{vae}
config.json holds the recipe's settings: segment images with its `--predict IMAGE... --from`.
"""


def load_checkpoint_for_export(out: PathLike, which: str, models: dict[str, nn.Module]) -> Path:
    """--export: the weights of `which` ("latest": the newest checkpoint in `out`) into `models`."""
    from .train import latest_checkpoint, load_checkpoint, print0

    path = latest_checkpoint(out) if which == "latest" else Path(which)
    if path is None:
        raise CheckpointError(f"{out}: no checkpoint to export (train first, or give --export CHECKPOINT)")
    load_checkpoint(path, models, restore_rng=False)
    print0(f"--export: loaded {path}")
    return path


def read_export(run: PathLike, recipe: str) -> tuple[Path, dict, dict[str, Tensor]]:
    """(folder, config, tensors on the CPU) of `recipe`'s export in `run` (see `export_folder`);
    config["model"] is the frozen model's id or path, or the demos' sd/ folder written beside."""
    folder = export_folder(run)
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if config.get("recipe") != recipe:
        raise CheckpointError(f"{folder}: an export of {config.get('recipe')!r}, not of {recipe!r}: use that recipe's script")
    if isinstance(config.get("model"), str) and (folder / config["model"]).is_dir():
        config["model"] = str(folder / config["model"])
    path = folder / "model.safetensors"
    if not path.is_file():  # DiffewS: the whole model is the diffusers folder
        return folder, config, {}
    refuse_pickle(path)
    try:
        return folder, config, load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def trained_tensors(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The trained parameters (requires_grad) and every buffer of `module`, prefixed."""
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in module.named_buffers()}
    return {prefix + k: v for k, v in module.state_dict().items() if k in trained or k in buffers}


def load_tensors(module: nn.Module, tensors: dict[str, Tensor], source: str, prefix: str = "", partial: bool = False) -> nn.Module:
    """Load the `prefix`ed entries of `tensors` into `module`. `partial`: what is absent keeps the
    frozen weights the module was built with; else every tensor must be there. Missing or
    unexpected names, or shapes that differ, are a `CheckpointError` naming them."""
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    unexpected = sorted(set(own) - set(module.state_dict()))
    missing = [] if partial else sorted(set(module.state_dict()) - set(own))
    if unexpected or missing:
        raise CheckpointError(f"{source}: does not fit this model: unexpected tensors {unexpected[:5]}, missing {missing[:5]}")
    try:
        module.load_state_dict(own, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: does not fit this model ({str(e).splitlines()[-1].strip()})") from None
    return module
