"""Using trained models: each recipe's demo trains a few steps and exports RUN/model; the export
reloads (`load_trained`) and segments an image the test writes at an odd size, through the
command line (`--predict ... --from`) as through Python; the prediction equals what the recipe's
own evaluation computes for that image from the training checkpoint (not the export). The
DiffewS export is a diffusers folder: `load_sd` reads it and diffusers reads its U-Net; `--export
CHECKPOINT` exports an older checkpoint. Inputs of any mode are read; a mask that is not a mask
says so in one line. The recipes' real-run settings (keep-ratio resize, sliding windows) are
exercised on the QueryDiff demo's export with its config so set."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unet_seg.errors import InputError
from unet_seg.predict import image_files, read_image, read_mask
from unet_seg.segmentation import resize_labels
from unet_seg.train import latest_checkpoint, load_checkpoint

from .helpers import keeping_checkpoints, load_recipe, randomise_, rel_err

ODD = (45, 70)  # H, W: neither a multiple of 8 nor square


def scene(path, size=ODD, mode="RGB", seed=0):
    """A picture of a bright square on a dark textured ground, written as `mode` (RGB, L, RGBA, JPEG by suffix)."""
    g = np.random.default_rng(seed)
    h, w = size
    a = (g.random((h, w, 3)) * 60).astype(np.uint8)
    a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (230, 200, 40)
    img = Image.fromarray(a).convert(mode)
    img.save(path)
    return path


def square_mask(path, size=ODD):
    h, w = size
    a = np.zeros((h, w), np.uint8)
    a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    Image.fromarray(a).save(path)
    return path


def run_cli(recipe, argv):
    """The recipe as its __main__ runs it: errors a user fixes end in one line (SystemExit)."""
    from unet_seg.cli import run

    run(lambda: recipe.main(argv), prog=recipe.__name__)


# ---------------------------------------------------------------------------------------------
# Inputs


def test_images_of_any_mode_read_as_rgb_in_minus_one_to_one(tmp_path):
    rgb = read_image(scene(tmp_path / "a.png"))
    assert rgb.shape == (3, *ODD) and rgb.min() >= -1 and rgb.max() <= 1
    grey = read_image(scene(tmp_path / "g.png", mode="L"))
    assert grey.shape == (3, *ODD) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    rgba = np.zeros((*ODD, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, ODD[1] // 2 :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "t.png")
    x = read_image(tmp_path / "t.png")
    assert torch.equal(x[:, 0, 0], torch.ones(3)) and torch.equal(x[:, 0, -1], torch.tensor([1.0, -1.0, -1.0]))  # white under transparency
    jpeg = read_image(scene(tmp_path / "j.jpg"))
    assert jpeg.shape == (3, *ODD)
    deep = np.linspace(0, 65535, ODD[0] * ODD[1]).reshape(ODD).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    x = read_image(tmp_path / "d.png")
    assert x.min() == -1 and x.max() == 1  # 16-bit scaled to its range, not clipped at 255
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(tmp_path / "bad.png")


def test_masks_must_be_masks(tmp_path):
    assert torch.equal(read_mask(square_mask(tmp_path / "m.png")).unique(), torch.tensor([0, 1]))
    Image.fromarray((np.arange(ODD[0] * ODD[1]).reshape(ODD) % 256).astype(np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(InputError, match=r"grey.png: not a mask: it holds 256 values \(0, 1, 2, 3, 4, 5, \.\.\.\)"):
        read_mask(tmp_path / "grey.png")
    with pytest.raises(InputError, match="colour channels differ"):
        read_mask(scene(tmp_path / "photo.png"))
    Image.fromarray(np.zeros(ODD, np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="empty"):
        read_mask(tmp_path / "empty.png")
    square_mask(tmp_path / "m.jpg")
    with pytest.raises(InputError, match="save masks as PNG"):
        read_mask(tmp_path / "m.jpg")


def test_folders_are_walked_and_outputs_keep_their_place(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    scene(tmp_path / "in" / "b.png")
    scene(tmp_path / "in" / "sub" / "b.jpg")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    found = image_files([tmp_path / "in"])
    assert [(p.relative_to(tmp_path).as_posix(), o.as_posix()) for p, o in found] == [("in/b.png", "b"), ("in/sub/b.jpg", "sub/b")]
    scene(tmp_path / "b.jpg")
    with pytest.raises(InputError, match="would both write b.png"):
        image_files([tmp_path / "in" / "b.png", tmp_path / "b.jpg"])
    with pytest.raises(InputError, match="no such file or folder"):
        image_files([tmp_path / "missing.png"])


def test_predictions_are_written_as_palette_pngs_of_the_class_ids_and_overlays(tmp_path):
    from unet_seg.predict import palette_for, write_prediction

    image = torch.rand(3, *ODD) * 2 - 1
    labels = torch.randint(0, 4, ODD)
    labels[0, 0] = 255  # ignore
    palette = palette_for(4, background=True)
    png, over = write_prediction(tmp_path, "sub/x", image, labels, palette, untinted=0)
    written = Image.open(png)
    assert png == tmp_path / "sub" / "x.png" and written.mode == "P"
    assert np.array_equal(np.asarray(written), labels.numpy())
    colours = np.array(written.getpalette()[: 3 * 256]).reshape(256, 3)
    assert np.array_equal(colours[:4], palette) and tuple(colours[0]) == (0, 0, 0)
    rgb, blended = np.asarray(Image.open(over)).astype(int), ((image.permute(1, 2, 0) + 1) * 127.5).round().numpy()
    bg, fg = (labels == 0).numpy(), (labels == 2).numpy()
    assert np.array_equal(rgb[bg], blended[bg])  # background untinted
    assert np.abs(rgb[fg] - (blended[fg] + palette[2]) / 2).max() <= 1  # class 2 half its colour
    mask, _ = write_prediction(tmp_path, "m", image, (labels == 2).long(), palette, binary=True)
    assert set(np.unique(np.asarray(Image.open(mask))).tolist()) == {0, 255}


# ---------------------------------------------------------------------------------------------
# DiffewS


def test_diffews_exports_a_diffusers_folder_and_predicts_what_its_evaluation_computes(tmp_path, capsys, cpu_only):
    diffusers = pytest.importorskip("diffusers")
    from unet_seg import load_sd
    from unet_seg.demo import BlockCodec, tiny_sd

    recipe, run = load_recipe("diffews_coco20i"), tmp_path / "run"
    with keeping_checkpoints(recipe.main, run, tmp_path / "kept") as kept:  # the finished demo deletes its step-1 checkpoint
        recipe.main(["--demo", "--random-demo-model", "--steps", "2", "--batch-size", "2", "--eval-items", "2", "--save-every", "1", "--out", str(run)])
    assert sorted(p.name for p in run.glob("step_*")) == [latest_checkpoint(run).name]
    model = run / "model"
    assert "conv_in_support" in (model / "README.md").read_text()
    assert json.loads((model / "config.json").read_text())["recipe"] == "diffews"

    # the training checkpoint, rebuilt as the recipe builds it, next to what the export holds
    torch.manual_seed(0)
    sd = tiny_sd()
    sd.unet.add_support_conv_in(8)
    load_checkpoint(latest_checkpoint(run), {"unet": sd.unet})
    exported = load_sd(model, components=["unet", "text_encoder", "tokenizer"])
    for name, p in sd.unet.state_dict().items():
        assert torch.equal(exported.unet.state_dict()[name], p), name
    ref = diffusers.UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), sd.encode_prompt(["", "a cat"])
    with torch.no_grad():
        err = rel_err(ref(x, t, context).sample, sd.unet(x, t, context))
    assert err <= 1e-4, err  # measured 0.0: the same U-Net, its support conv_in left out

    query, s1, s2 = scene(tmp_path / "q.png", mode="RGBA"), scene(tmp_path / "s1.jpg", (37, 52), seed=1), scene(tmp_path / "s2.png", (64, 30), "L", 2)
    m1, m2 = square_mask(tmp_path / "m1.png", (37, 52)), square_mask(tmp_path / "m2.png", (64, 30))
    capsys.readouterr()
    recipe.main(["--predict", str(query), "--from", str(run), "--support", str(s1), str(m1), "--support", str(s2), str(m2)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "q.png" in lines[0] and "foreground" in lines[0]
    png = np.asarray(Image.open(run / "predictions" / "q.png"))
    assert png.shape == ODD and set(np.unique(png).tolist()) <= {0, 255}
    assert Image.open(run / "predictions" / "q_overlay.png").size == (ODD[1], ODD[0])

    # the recipe's evaluation on the same 2-shot episode, resized as COCO-20i's are
    from unet_seg.data.coco20i import _resize

    size = (64, 64)
    images, masks = zip(*[_resize(read_image(i), read_mask(m), 64) for i, m in ((s1, m1), (s2, m2))])
    episode = dict(query=_resize(read_image(query), torch.zeros(ODD, dtype=torch.long), 64)[0], query_mask=torch.zeros(size, dtype=torch.long),
                   supports=torch.stack(images), support_masks=torch.stack(masks), class_id=torch.tensor(1))  # fmt: skip
    _, shown = recipe.evaluate(sd.unet, [episode], vae=BlockCodec(), context=sd.encode_prompt([""])[:, :2], num_labels=6,
                               device=torch.device("cpu"), seed=0)  # fmt: skip
    expected = resize_labels(shown[0][3][None], ODD)[0]
    assert 0 < expected.float().mean() < 1  # a mask with both classes: the comparison below can fail
    assert torch.equal(torch.from_numpy(png // 255).long(), expected)
    predictor = recipe.load_trained(run)
    assert torch.equal(predictor(query, supports=[(s1, m1), (s2, m2)]), expected)  # the Python path

    not_a_mask = scene(tmp_path / "photo.png", (37, 52), mode="L")
    with pytest.raises(SystemExit, match=r"error: .*photo.png: not a mask: it holds \d+ values"):
        run_cli(recipe, ["--predict", str(query), "--from", str(run), "--support", str(s1), str(not_a_mask)])
    # --export CHECKPOINT, with the training flags: an older checkpoint's weights replace the export
    from safetensors.torch import load_file

    from unet_seg.train import checkpoint_path

    recipe.main(["--demo", "--random-demo-model", "--out", str(run), "--export", str(checkpoint_path(kept, 1))])
    step1 = {k.removeprefix("model/unet/"): v for k, v in load_file(str(checkpoint_path(kept, 1))).items() if k.startswith("model/unet/")}
    exported = load_sd(model, components=["unet"]).unet.state_dict()
    assert set(exported) == set(step1) and all(torch.equal(exported[k], v) for k, v in step1.items())
    assert not all(torch.equal(sd.unet.state_dict()[k], v) for k, v in step1.items())  # step 2 differs: the export did change
    with pytest.raises(SystemExit, match="no model/config.json"):
        run_cli(recipe, ["--predict", str(query), "--from", str(tmp_path), "--support", str(s1), str(m1)])
    with pytest.raises(SystemExit):  # a usage error: supports are needed
        recipe.parse_args(["--predict", str(query), "--from", str(run)])
    assert "give --support" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The semantic recipes: export, reload, predict, compare with the recipe's evaluation


def checkpoint_tensors(folder, model: str) -> dict:
    from safetensors.torch import load_file

    prefix = f"model/{model}/"
    return {k[len(prefix) :]: v for k, v in load_file(str(latest_checkpoint(folder))).items() if k.startswith(prefix)}


def predict_one(recipe, run, image, capsys, extra=()):
    """`--predict IMAGE --from RUN` as a user runs it -> (labels read from <stem>.png, the printed line)."""
    capsys.readouterr()
    recipe.main(["--predict", str(image), "--from", str(run), *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and image.name in lines[0]
    png = Image.open(run / "predictions" / f"{image.stem}.png")
    assert png.mode == "P" and png.size == (ODD[1], ODD[0])
    assert Image.open(run / "predictions" / f"{image.stem}_overlay.png").size == png.size
    return torch.from_numpy(np.asarray(png).astype(np.int64)), lines[0]


def test_diff_exports_the_trained_head_and_predicts_what_its_evaluation_computes(tmp_path, capsys, cpu_only):
    recipe, run = load_recipe("diff_gta2cs"), tmp_path / "run"
    recipe.main(["--demo", "--random-demo-model", "--steps", "2", "--pretrain-steps", "2", "--batch-size", "2", "--eval-items", "2", "--no-baseline", "--out", str(run)])
    image = scene(tmp_path / "street.jpg", mode="L")
    labels, line = predict_one(recipe, run, image, capsys)

    predictor = recipe.load_trained(run)
    segmenter, unet = predictor.modules["segmenter"], predictor.modules["unet"]
    for module, name in ((segmenter, "segmenter"), (unet, "unet")):  # the export holds the checkpoint's weights
        trained = checkpoint_tensors(run, name)
        assert set(trained) == set(module.state_dict())
        assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())
    assert torch.equal(predictor(image), labels)
    # the recipe's evaluation of that image: resized as its test set (64²), logits scored at the label's size
    from unet_seg.predict import resize_image

    frozen = recipe.Frozen(unet, predictor.modules["vae"], predictor.modules["empty_prompt"], [], predictor.modules["schedule"], segmenter.config["level_channels"])
    args = recipe.parse_args(["--demo"])
    item = {"image": resize_image(read_image(image), (64, 64)), "label": labels}
    metrics, _ = recipe.evaluate(segmenter, frozen, {"mine": [item]}, len(predictor.class_names), predictor.class_names, torch.device("cpu"), args)
    assert metrics["mine"] == 100.0 and len(labels.unique()) > 1


def test_querydiff_exports_the_model_without_its_training_branch_and_predicts_what_its_evaluation_computes(tmp_path, capsys, cpu_only):
    from unet_seg.predict import resize_image

    recipe, run = load_recipe("querydiff_gta2cs"), tmp_path / "run"
    recipe.main(["--demo", "--random-demo-model", "--steps", "2", "--teacher-steps", "2", "--batch-size", "2", "--eval-items", "2", "--no-compare", "--out", str(run)])
    image = scene(tmp_path / "photo.png", mode="RGBA")
    labels, line = predict_one(recipe, run, image, capsys)

    predictor = recipe.load_trained(run)
    model = predictor.modules["model"]
    trained = checkpoint_tensors(run / "querydiff", "model")
    assert {k for k in trained if not k.startswith(("tokens.", "dcl."))} == set(model.state_dict())  # the DCL is training only
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in model.state_dict())
    assert torch.equal(predictor(image), labels)
    # the recipe's evaluation of that image: resized as its test set (64², whole), scores at the label's size;
    # 2 steps leave one class everywhere, so the comparison runs on randomised weights (shared by both paths)
    randomise_(model, 1)
    labels = predictor(image)
    item = {"image": resize_image(read_image(image), (64, 64)), "label": labels}
    conf, _ = recipe.evaluate(model, [item], len(predictor.class_names), torch.device("cpu"))
    assert conf.sum() == labels.numel() and conf.diagonal().sum() == conf.sum() and len(labels.unique()) > 1

    # real runs resize keeping the aspect and slide windows, as their evaluation: the same export so configured
    from unet_seg.data.transforms import ResizeImage

    config = json.loads((run / "model" / "config.json").read_text())
    config |= {"resize": {"scale": [96, 64]}, "window": [[32, 32], [21, 21]]}
    (run / "model" / "config.json").write_text(json.dumps(config))
    sliding = recipe.load_trained(run)
    randomise_(sliding.modules["model"], 1)
    labels = sliding(image)
    item = {"image": ResizeImage((96, 64))(read_image(image), labels, None)[0], "label": labels}
    assert item["image"].shape[-2:] == (64, 96)  # three windows across, two down
    conf, _ = recipe.evaluate(sliding.modules["model"], [item], len(predictor.class_names), torch.device("cpu"), window=((32, 32), (21, 21)))
    assert conf.sum() == labels.numel() and conf.diagonal().sum() == conf.sum() and len(labels.unique()) > 1


def test_digseg_exports_predicts_what_its_evaluation_computes_and_takes_your_own_class_names(tmp_path, capsys, cpu_only):
    from unet_seg.data.synthetic import CLASS_NAMES

    recipe, run = load_recipe("digseg_ade20k"), tmp_path / "run"
    recipe.main(["--demo", "--random-demo-model", "--steps", "2", "--batch-size", "2", "--eval-items", "2", "--size", "64", "--ddim-steps", "3", "--out", str(run)])
    image = scene(tmp_path / "garden.jpg")
    labels, line = predict_one(recipe, run, image, capsys)

    predictor = recipe.load_trained(run)
    model = predictor.modules["digseg"]
    trained = checkpoint_tensors(run, "digseg")
    assert set(trained) == set(model.state_dict()) and all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert torch.equal(predictor(image), labels)
    # the recipe's evaluation of that image (resized to 64² inside, probabilities at the label's size, τ floor);
    # 2 steps leave background everywhere, so it runs on randomised weights (shared by both paths)
    randomise_(model, 3)
    labels = predictor(image)
    sd, args = recipe.demo_sd(True), recipe.parse_args(["--demo", "--random-demo-model", "--size", "64", "--ddim-steps", "3"])
    kw = dict(vae=sd.vae, schedule=sd.schedule, class_embeds=predictor.modules["class_embeds"], class_ids=torch.tensor(predictor.config["class_ids"]),
              vocab=(len(CLASS_NAMES), 0, 0), settings=[(1, 3)], size=64, device=torch.device("cpu"), seed=0, threshold=0.7)  # fmt: skip
    conf, _, _ = recipe.evaluate(model, [{"image": read_image(image), "label": labels}], **kw)
    conf = conf["DiGSeg 1x3, τ 0.7"]
    assert conf.sum() == labels.numel() and conf.diagonal().sum() == conf.sum() and len(labels.unique()) > 1

    # your own names go through the training's text path: the trained names, given as --classes, give the same map
    names = [CLASS_NAMES[c] for c in predictor.config["class_ids"]]
    mine = recipe.load_trained(run, classes=names)
    randomise_(mine.modules["digseg"], 3)
    assert torch.allclose(mine.modules["class_embeds"], predictor.modules["class_embeds"])
    lookup = torch.zeros(256, dtype=torch.long)
    lookup[torch.tensor(predictor.config["class_ids"])] = torch.arange(1, len(names) + 1)
    assert torch.equal(mine(image), lookup[labels])
    capsys.readouterr()
    recipe.main(["--predict", str(image), "--from", str(run), "--classes", "cat, grass,sky", "--out", str(tmp_path / "mine")])
    assert "garden.jpg" in capsys.readouterr().out
    assert set(np.unique(np.asarray(Image.open(tmp_path / "mine" / "garden.png"))).tolist()) <= {0, 1, 2, 3}
