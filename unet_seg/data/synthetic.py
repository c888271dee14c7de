"""Procedural scenes with exact masks, for `--demo` runs and tests (no downloads).

A scene is a background (smooth colour gradient + low-frequency noise + thin clutter lines that
belong to no class) with objects painted on it, later objects on top. An object's class is its
**form** and its **texture**; its colours are drawn per instance, so colour says nothing about
the class and a model has to look at shape and pattern:

    forms     disc, ring, square, triangle, cross              (random size, position, rotation)
    textures  striped, checkered, dotted (two colours, random period, angle and phase),
              speckled (one colour plus per-pixel grain)

20 classes, ids 1..20, named `"<texture> <form>"` (usable as text prompts: "striped disc");
`CLASS_NAMES[c]` is the name of id c and `CLASS_NAMES[0]` is "background". The ids are ordered
so that the COCO-20i rule (fold f tests ids {4k + f + 1}) gives 4 folds of 5 held-out classes
in which every form occurs once and every texture at least once: a held-out class is an unseen
pairing of a form and a texture that are both seen in training (`fold_split`).

Conventions:

    image   float32 [3, H, W] in [-1, 1] (SD's VAE input convention)
    labels  int64 [H, W]: 0 background, 1..20 classes, 255 ignore (only with `ignore_border` > 0:
            the pixels whose (2w+1)² neighbourhood holds another label, a band of 2w pixels along
            every edge, like the VOC boundaries)
    masks   int64 [H, W] in {0, 1} (255 where the labels are 255); per-class masks of a label map:
            `unet_seg.codecs.label_map_to_masks(labels, NUM_CLASSES + 1)`
    size    an int (square) or (H, W); multiples of 8, at least 32. Sizes of objects, textures and
            lines are fractions of min(H, W), so a scene looks the same at every resolution.

Styles (`Style`) change the look of everything after the scene is painted (colour mixing,
contrast, brightness, per-image colour jitter, blur, sensor noise) and never the label map:
the same seed gives the same labels under every style. `CLEAN_STYLE` and `HAZY_STYLE` are the
two domains of the domain-generalisation demos (train on one, evaluate on the other).

Items are dicts of named tensors, as every dataset of `unet_seg.data` returns (a DataLoader
batch stacks each field): {"image", "label"} for scenes, {"query", "query_mask", "supports",
"support_masks", "class_id"} for few-shot episodes. Every item is a pure function of (seed,
index): it gets its own torch.Generator, so a dataset can be read in any order, split across
processes, or resumed. Rendering is vectorised over
pixels; about a millisecond per 64×64 image on one core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

FORMS = ("disc", "ring", "square", "triangle", "cross")
TEXTURES = ("striped", "checkered", "dotted", "speckled")
NUM_FOLDS = 4
# id 4k + j + 1 is form k with texture (j + k) mod 4: fold j holds every form once (Latin square).
_FORM_TEXTURE = tuple((k, (j + k) % len(TEXTURES)) for k in range(len(FORMS)) for j in range(NUM_FOLDS))
CLASS_NAMES = ("background",) + tuple(f"{TEXTURES[t]} {FORMS[k]}" for k, t in _FORM_TEXTURE)
NUM_CLASSES = len(_FORM_TEXTURE)
ALL_CLASSES = tuple(range(1, NUM_CLASSES + 1))
IGNORE_INDEX = 255

Size = Union[int, tuple[int, int]]


def fold_split(fold: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train class ids, test class ids) of `fold` in 0..3: test = {4k + fold + 1} (the COCO-20i
    rule), train = the other 15. The 4 test sets are disjoint and cover ids 1..20."""
    if not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be an int in [0, {NUM_FOLDS}), got {fold!r}")
    test = tuple(c for c in ALL_CLASSES if (c - 1) % NUM_FOLDS == fold)
    return tuple(c for c in ALL_CLASSES if c not in test), test


# ---------------------------------------------------------------------------------------------
# Styles


@dataclass(frozen=True)
class Style:
    """The look of a domain, applied to a painted image x [3, H, W]:

        x ← contrast · (colour_matrix @ x) + brightness          (per pixel, rows = out channels)
        x ← x · (1 + jitter·u₁) + jitter·u₂                      (u₁, u₂ ~ U(−1, 1)³ per image)
        x ← GaussianBlur_σ(x) + noise_std · ε,  ε ~ N(0, 1)       then clamped to [−1, 1]
    """

    colour_matrix: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    contrast: float = 1.0
    brightness: float = 0.0
    jitter: float = 0.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0


CLEAN_STYLE = Style(jitter=0.05, noise_std=0.02)
# Hazy: channels cycled and desaturated (rows are convex mixes), low contrast, brighter, blurred, noisy.
HAZY_STYLE = Style(
    colour_matrix=((0.2, 0.7, 0.1), (0.1, 0.2, 0.7), (0.7, 0.1, 0.2)),
    contrast=0.55,
    brightness=0.25,
    jitter=0.15,
    blur_sigma=0.8,
    noise_std=0.08,
)


def random_style(generator: torch.Generator) -> Style:
    """A random look for demo stand-ins of web-scale pre-training (a tiny U-Net that "has seen many
    domains"): colour matrix rows softmax(2·N(0, 1)) (convex mixes), contrast U(0.5, 1.1),
    brightness U(−0.2, 0.2), jitter 0.1, blur σ U(0, 1), noise std U(0, 0.08) — the ranges of
    the DIFF demo. The family overlaps HAZY_STYLE's kind of shift (mixed colours, low contrast,
    blur, noise) but never contains it (its brightness 0.25 lies outside)."""
    g = generator
    return Style(
        colour_matrix=tuple(tuple(r) for r in torch.softmax(2 * torch.randn(3, 3, generator=g), 1).tolist()),
        contrast=0.5 + 0.6 * float(torch.rand((), generator=g)),
        brightness=0.4 * float(torch.rand((), generator=g)) - 0.2,
        jitter=0.1,
        blur_sigma=float(torch.rand((), generator=g)),
        noise_std=0.08 * float(torch.rand((), generator=g)),
    )


def _apply_style(image: Tensor, style: Style, g: torch.Generator) -> Tensor:
    """image [3, H, W] -> styled image [3, H, W] in [-1, 1]. Draws the same random numbers for
    every style, so nothing drawn later depends on the style."""
    u = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
    noise = torch.randn(image.shape, generator=g)
    matrix = torch.tensor(style.colour_matrix, dtype=image.dtype)
    x = style.contrast * torch.einsum("oc,chw->ohw", matrix, image) + style.brightness
    x = x * (1 + style.jitter * u[0]) + style.jitter * u[1]
    if style.blur_sigma > 0:
        x = _gaussian_blur(x, style.blur_sigma)
    return (x + style.noise_std * noise).clamp(-1, 1)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """x [C, H, W] -> separable Gaussian blur with radius ceil(2σ), reflect padding."""
    radius = math.ceil(2 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


# ---------------------------------------------------------------------------------------------
# Forms: (u, v) [H, W] are object coordinates in units of its radius -> inside, bool [H, W].
# Textures: (a, b) [H, W] texture coordinates in units of its period, colours c0, c1 [3, 1, 1],
# grain [3, H, W] ~ N(0, 1) -> paint [3, H, W].


def _disc(u: Tensor, v: Tensor) -> Tensor:
    return u**2 + v**2 <= 1


def _ring(u: Tensor, v: Tensor) -> Tensor:
    r2 = u**2 + v**2
    return (r2 <= 1) & (r2 >= 0.55**2)


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.8


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral, circumradius 1.15 (inradius 0.575): three half-planes."""
    inside = torch.ones_like(u, dtype=torch.bool)
    for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.575
    return inside


def _cross(u: Tensor, v: Tensor) -> Tensor:
    au, av = u.abs(), v.abs()
    return ((au <= 0.33) & (av <= 0.95)) | ((av <= 0.33) & (au <= 0.95))


def _striped(a: Tensor, b: Tensor, c0: Tensor, c1: Tensor, grain: Tensor) -> Tensor:
    return torch.where(a - a.floor() < 0.5, c1, c0)


def _checkered(a: Tensor, b: Tensor, c0: Tensor, c1: Tensor, grain: Tensor) -> Tensor:
    return torch.where((torch.floor(2 * a) + torch.floor(2 * b)) % 2 == 0, c1, c0)


def _dotted(a: Tensor, b: Tensor, c0: Tensor, c1: Tensor, grain: Tensor) -> Tensor:
    return torch.where((a - a.floor() - 0.5) ** 2 + (b - b.floor() - 0.5) ** 2 < 0.32**2, c1, c0)


def _speckled(a: Tensor, b: Tensor, c0: Tensor, c1: Tensor, grain: Tensor) -> Tensor:
    return c0 + 0.15 * grain


_FORM_FNS = (_disc, _ring, _square, _triangle, _cross)  # in FORMS order
_TEXTURE_FNS = (_striped, _checkered, _dotted, _speckled)  # in TEXTURES order


# ---------------------------------------------------------------------------------------------
# Scenes


def scene(
    generator: torch.Generator,
    class_ids: Sequence[int],
    size: Size = 64,
    style: Style = CLEAN_STYLE,
    ignore_border: int = 0,
) -> tuple[Tensor, Tensor]:
    """One scene: objects of `class_ids` painted in that order (the last on top) on a random
    background -> (image float32 [3, H, W] in [-1, 1], labels int64 [H, W]).

    The random numbers drawn do not depend on the classes or the style: the same generator
    state with other class ids of the same count gives objects with the same geometry and
    colours, and with another style the same label map.
    """
    h, w = _check_size(size)
    _check_class_ids(class_ids, "class_ids")
    _check_ignore_border(ignore_border)
    s = min(h, w)
    y = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
    x = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5

    image = _background(generator, y, x, s)
    grain = torch.randn(3, h, w, generator=generator)
    labels = torch.zeros(h, w, dtype=torch.long)
    for c in class_ids:
        form, texture = _FORM_TEXTURE[c - 1]
        p = torch.rand(8, generator=generator)
        c0 = torch.rand(3, generator=generator) * 1.8 - 0.9
        c1 = (c0 - 1.1 * torch.sign(c0)).clamp(-1, 1)  # every channel 1.1 away from c0
        radius = (0.13 + 0.09 * p[0]) * s
        cy = 0.7 * radius + p[1] * (h - 1.4 * radius)
        cx = 0.7 * radius + p[2] * (w - 1.4 * radius)
        dy, dx = y - cy, x - cx
        rot, angle = p[3] * 2 * math.pi, p[4] * math.pi
        period = (0.10 + 0.04 * p[5]) * s
        u = (dx * torch.cos(rot) + dy * torch.sin(rot)) / radius
        v = (dy * torch.cos(rot) - dx * torch.sin(rot)) / radius
        a = (dx * torch.cos(angle) + dy * torch.sin(angle)) / period + p[6]
        b = (dy * torch.cos(angle) - dx * torch.sin(angle)) / period + p[7]
        inside = _FORM_FNS[form](u, v)
        paint = _TEXTURE_FNS[texture](a, b, c0.view(3, 1, 1), c1.view(3, 1, 1), grain)
        image = torch.where(inside, paint, image)
        labels = torch.where(inside, c, labels)
    if ignore_border > 0:
        labels = _ignore_boundaries(labels, ignore_border)
    return _apply_style(image.clamp(-1, 1), style, generator), labels


def _background(g: torch.Generator, y: Tensor, x: Tensor, s: int) -> Tensor:
    """Gradient along a random direction + bilinear 4×4 noise + 3 thin lines -> [3, H, W]."""
    h, w = y.shape[0], x.shape[1]
    base = torch.rand(3, 1, 1, generator=g) * 1.2 - 0.6
    slope = torch.rand(3, 1, 1, generator=g) * 0.7 - 0.35
    direction = torch.rand((), generator=g) * 2 * math.pi
    ramp = ((x / w) * 2 - 1) * torch.cos(direction) + ((y / h) * 2 - 1) * torch.sin(direction)
    blotches = F.interpolate(0.2 * torch.randn(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear")[0]
    image = base + slope * ramp + blotches

    ends = torch.rand(3, 4, generator=g) * torch.tensor([h, w, h, w])  # y0, x0, y1, x1 per line
    half_width = (0.008 + 0.012 * torch.rand(3, 1, 1, generator=g)) * s
    colours = torch.rand(3, 3, generator=g) * 2 - 1
    p0y, p0x, p1y, p1x = (ends[:, i].view(3, 1, 1) for i in range(4))
    dy, dx = p1y - p0y, p1x - p0x
    t = (((y - p0y) * dy + (x - p0x) * dx) / (dy**2 + dx**2 + 1e-6)).clamp(0, 1)
    on_line = (y - p0y - t * dy) ** 2 + (x - p0x - t * dx) ** 2 <= half_width**2  # [3 lines, H, W]
    for i in range(3):
        image = torch.where(on_line[i], colours[i].view(3, 1, 1), image)
    return image


def _ignore_boundaries(labels: Tensor, width: int) -> Tensor:
    """labels [H, W] -> labels with 255 wherever the (2w+1)² window holds another label."""
    k = 2 * width + 1
    lab = labels.float()[None, None]
    hi = F.max_pool2d(lab, k, stride=1, padding=width)
    lo = -F.max_pool2d(-lab, k, stride=1, padding=width)
    return torch.where((hi != lo)[0, 0], IGNORE_INDEX, labels)


def _generator(*keys: int) -> torch.Generator:
    """A generator seeded by splitmix64 over the keys (seed, index, role): independent,
    reproducible streams per item."""
    mask = (1 << 64) - 1
    z = 0
    for key in keys:
        z = (z + key + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
    return torch.Generator().manual_seed(z)


# ---------------------------------------------------------------------------------------------
# Datasets


class SemanticScenes(Dataset):
    """Item i -> {"image": [3, H, W], "label": [H, W]}: a scene of `objects[0]..objects[1]` objects
    (count and classes uniform, repeats allowed; with `distinct`, no class twice) of `classes`,
    pure function of (seed, i). For semantic segmentation demos (DIFF, QueryDiff, DiGSeg)."""

    def __init__(
        self,
        seed: int,
        length: int,
        size: Size = 64,
        classes: Sequence[int] = ALL_CLASSES,
        objects: tuple[int, int] = (2, 4),
        style: Style = CLEAN_STYLE,
        ignore_border: int = 0,
        distinct: bool = False,
    ):
        _check_seed_and_length(seed, length)
        _check_size(size)
        _check_classes(classes)
        _check_ignore_border(ignore_border)
        lo, hi = objects
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"objects must be (min, max) ints with 1 <= min <= max, got {objects!r}")
        if distinct and hi > len(set(classes)):
            raise ValueError(f"distinct objects need at least {hi} classes, got {tuple(classes)}")
        self.distinct = distinct
        self.seed, self.length, self.size, self.classes = seed, length, size, tuple(classes)
        self.objects, self.style, self.ignore_border = (lo, hi), style, ignore_border

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        _check_index(index, self.length)
        g = _generator(self.seed, index)
        lo, hi = self.objects
        count = int(torch.randint(lo, hi + 1, (), generator=g))
        if self.distinct:
            picks = torch.randperm(len(self.classes), generator=g)[:count].tolist()
        else:
            picks = torch.randint(len(self.classes), (count,), generator=g).tolist()
        image, label = scene(g, [self.classes[i] for i in picks], self.size, self.style, self.ignore_border)
        return {"image": image, "label": label}


class FewShotEpisodes(Dataset):
    """Item i -> an episode of class `classes[i % len(classes)]` (classes balanced over the
    indices). The query and each support are scenes of `distractors` objects of other classes
    from `classes` (uniform, repeats allowed) with one object of the episode's class on top,
    so every image contains the class. A class set from `fold_split` keeps every object of an
    episode inside that fold.

    random_order: paint the query's objects in a random order, so the episode's object is not
    always the complete one on top (nothing but its class tells it from the distractors); the
    order comes from a stream of its own, so the objects' geometry and colours are unchanged.
    supports_of="distractor": a control episode: the same query and query mask, but supports of
    the class of the query's first distractor (another class that the query holds); with the
    same draws as the episode's own supports, so only the supports' class differs.

    Image j of episode i (0 the query, 1..K the supports) depends only on (seed, i, j): the
    first k supports of a K-shot episode are the k-shot episode, and the queries agree.

    An episode: {"query": [3, H, W] float32 in [-1, 1], "query_mask": [H, W] int64 in {0, 1}
    (255 on ignore borders), "supports": [K, 3, H, W], "support_masks": [K, H, W],
    "class_id": [] int64 in 1..20}.
    """

    def __init__(
        self,
        seed: int,
        length: int,
        classes: Sequence[int],
        shots: int = 1,
        size: Size = 64,
        distractors: int = 1,
        style: Style = CLEAN_STYLE,
        ignore_border: int = 0,
        random_order: bool = False,
        supports_of: str = "episode",
    ):
        _check_seed_and_length(seed, length)
        _check_size(size)
        _check_classes(classes)
        _check_ignore_border(ignore_border)
        if supports_of not in ("episode", "distractor"):
            raise ValueError(f"supports_of must be 'episode' or 'distractor', got {supports_of!r}")
        if supports_of == "distractor" and distractors < 1:
            raise ValueError("supports_of='distractor' needs distractors >= 1 (the query's other class)")
        if not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be an int >= 1, got {shots!r}")
        if not isinstance(distractors, int) or distractors < 0:
            raise ValueError(f"distractors must be an int >= 0, got {distractors!r}")
        if distractors > 0 and len(set(classes)) < 2:
            raise ValueError(f"distractors need at least 2 distinct classes, got classes={tuple(classes)}")
        self.seed, self.length, self.classes, self.shots = seed, length, tuple(classes), shots
        self.size, self.distractors, self.style, self.ignore_border = size, distractors, style, ignore_border
        self.random_order, self.supports_of = random_order, supports_of

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        _check_index(index, self.length)
        c = self.classes[index % len(self.classes)]
        images, masks, shown = [], [], c
        for j in range(self.shots + 1):
            g = _generator(self.seed, index, j)
            others = [k for k in self.classes if k != shown]
            picks = [others[i] for i in torch.randint(len(others), (self.distractors,), generator=g).tolist()] if others else []
            objects = picks + [shown]
            if self.random_order and j == 0:  # own stream: the same geometry whatever the order
                objects = [objects[i] for i in torch.randperm(len(objects), generator=_generator(self.seed, index, j, 1)).tolist()]
            image, labels = scene(g, objects, self.size, self.style, self.ignore_border)
            images.append(image)
            masks.append(torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, (labels == shown).long()))
            if j == 0 and self.supports_of == "distractor":
                shown = picks[0]
        return {
            "query": images[0],
            "query_mask": masks[0],
            "supports": torch.stack(images[1:]),
            "support_masks": torch.stack(masks[1:]),
            "class_id": torch.tensor(c),
        }


# ---------------------------------------------------------------------------------------------
# Captions: what a scene shows, in words (pre-training the demos' tiny text-to-image model)

HUES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")  # 45° sectors from red's 0°


def colour_name(rgb: Tensor) -> str:
    """Mean colour [3] in [-1, 1] -> a name: "black", "grey" or "white" when its chroma
    (max − min channel) is below 0.12, else the `HUES` sector of its hue (45° each, red centred
    on 0°; "pink" the sector before red), so pure yellow (60°) is "orange" and "yellow" is
    yellow-green: equal sectors, not the usual names' hues, kept because the packaged demo SD was
    trained on these captions. The grey threshold suits the muted looks of `random_style`."""
    r, g, b = rgb.float().cpu().tolist()
    hi, lo = max(r, g, b), min(r, g, b)
    if hi - lo < 0.12:
        return "black" if hi < -0.45 else "white" if lo > 0.45 else "grey"
    hue = math.degrees(math.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return HUES[int(((hue + 22.5) % 360) // 45)]


_ROWS, _COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")


def position_name(cy: float, cx: float) -> str:
    """A point in [0, 1]² (y down) -> "top left", "middle centre", ... (thirds of the image)."""
    row, col = _ROWS[min(int(3 * cy), 2)], _COLUMNS[min(int(3 * cx), 2)]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def describe(image: Tensor, labels: Tensor) -> str:
    """A scene's caption: its objects in reading order of their centres, each as `"<colour> <class
    name> at <position>"` (the mean colour of its visible pixels, `CLASS_NAMES`, `position_name`),
    then `"on <colour> background"`. image [3, H, W] in [-1, 1], labels [H, W] (0 background,
    1..20, 255 ignored). E.g. "red striped disc at top left, blue dotted cross at centre on grey background"."""
    h, w = labels.shape
    y = (torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32).view(1, w) + 0.5) / w
    objects = []
    for c in labels.unique().tolist():
        if c in (0, IGNORE_INDEX):
            continue
        mask = labels == c
        cy, cx = float(y.expand(h, w)[mask].mean()), float(x.expand(h, w)[mask].mean())
        objects.append((min(int(3 * cy), 2), cx, f"{colour_name(image[:, mask].mean(1))} {CLASS_NAMES[c]} at {position_name(cy, cx)}"))
    background = labels == 0
    back = f"on {colour_name(image[:, background].mean(1))} background" if background.any() else ""
    return " ".join(filter(None, [", ".join(text for _, _, text in sorted(objects)), back]))


class CaptionedScenes(Dataset):
    """Item i -> {"image": [3, H, W], "label": [H, W], "caption": str}: a scene of 1–4 objects of
    distinct classes among all 20 (`SemanticScenes`), in a look of its own (`random_style`; with
    probability `clean` the `CLEAN_STYLE`), captioned by `describe`. Pure function of (seed, i)."""

    def __init__(self, seed: int, length: int, size: Size = 64, objects: tuple[int, int] = (1, 4), clean: float = 0.25):
        self.scenes = SemanticScenes(seed, length, size, objects=objects, distinct=True)
        self.clean = clean

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        _check_index(index, len(self))
        g = _generator(self.scenes.seed, index, 1)
        style = CLEAN_STYLE if float(torch.rand((), generator=g)) < self.clean else random_style(g)
        g = _generator(self.scenes.seed, index)  # SemanticScenes' own draws, then the chosen look
        lo, hi = self.scenes.objects
        count = int(torch.randint(lo, hi + 1, (), generator=g))
        picks = torch.randperm(len(self.scenes.classes), generator=g)[:count].tolist()
        image, label = scene(g, [self.scenes.classes[i] for i in picks], self.scenes.size, style)
        return {"image": image, "label": label, "caption": describe(image, label)}


# ---------------------------------------------------------------------------------------------
# Checks


def _check_size(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    for n in (h, w):
        if not isinstance(n, int) or n < 32 or n % 8:
            raise ValueError(f"size must be an int or (H, W) of multiples of 8 that are >= 32, got {size!r}")
    return h, w


def _check_class_ids(ids: Sequence[int], name: str) -> None:
    bad = [c for c in ids if not isinstance(c, int) or not 1 <= c <= NUM_CLASSES]
    if bad:
        raise ValueError(f"{name} must be class ids in 1..{NUM_CLASSES}, got {bad[:5]}")


def _check_classes(classes: Sequence[int]) -> None:
    if len(classes) == 0:
        raise ValueError("classes must not be empty")
    _check_class_ids(classes, "classes")


def _check_ignore_border(width: int) -> None:
    if not isinstance(width, int) or width < 0:
        raise ValueError(f"ignore_border must be an int >= 0 (pixels), got {width!r}")


def _check_seed_and_length(seed: int, length: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of length {length}")
