"""Shared test utilities: random weights, error measures, hub layouts written by hand."""

import contextlib
import functools
import json
import math
import shutil
from pathlib import Path

import torch

from unet_seg.models.unet import TINY_SD1, TINY_SD2, UNet


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter: diffusers zero-initialises some convs, which hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model



def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, biases, norm affines and BatchNorm running statistics (zero or identity
    values hide bugs: a zero bias cannot tell a missing add from a present one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """vocab.json / merges.txt / tokenizer_config.json as SD checkpoints ship them (CLIP's vocabulary)."""
    from unet_seg.models import CLIPTokenizer

    tok = CLIPTokenizer.from_bpe()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tok.vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tok.merge_ranks) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token, "model_max_length": 77}))

def write_tiny_sd(folder: Path, prediction_type: str = "v_prediction", seed: int = 0, unet=None) -> Path:
    """An SD 2.x checkpoint folder in the diffusers hub layout (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/ with SD 2.1's scheduler settings), its three models
    tiny and random (TINY_SD2, TINY_VAE, TINY_SD2_TEXT) -> folder. `prediction_type`:
    "v_prediction" as stable-diffusion-2-1, "epsilon" as stable-diffusion-2-base; `unet`: another
    U-Net config (default TINY_SD2)."""
    from unet_seg.models import TINY_SD2, TINY_SD2_TEXT, TINY_VAE, AutoencoderKL, CLIPTextEncoder, UNet
    from unet_seg.pretrained import save_pretrained

    torch.manual_seed(seed)
    save_pretrained(UNet(unet or TINY_SD2), folder / "unet")
    save_pretrained(AutoencoderKL(TINY_VAE), folder / "vae")
    save_pretrained(CLIPTextEncoder(TINY_SD2_TEXT), folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", "!")  # SD 2.x pads with "!"
    scheduler = {
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": prediction_type, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    }  # fmt: skip
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = {
        "_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_tiny_clip(folder: Path, seed: int = 0, projection_dim: int = 24) -> Path:
    """A full CLIP checkpoint folder as openai/clip-vit-large-patch14 ships it (transformers'
    `CLIPModel`: config.json with text_config, vision_config, projection_dim; model.safetensors),
    tiny and random -> folder. Needs transformers (the `test` extra)."""
    import transformers

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=32)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    transformers.CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_dinov2(folder: Path, width: int = 32, heads: int = 2, layers: int = 24, grid: int = 37, seed: int = 0) -> Path:
    """A DINOv2 checkpoint folder as timm's hub repo `timm/vit_large_patch14_dinov2.lvd142m` ships
    it (config.json with `architecture` and, as timm writes for changed sizes, `model_args`;
    model.safetensors with timm's names, the key list written out here), random and `width` wide,
    at ViT-L's depth and 37 × 37 position grid by default -> folder."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    c = width
    tensors = {"cls_token": r(1, 1, c, std=1.0), "pos_embed": r(1, 1 + grid * grid, c, std=0.5), "patch_embed.proj.weight": r(c, 3, 14, 14, std=0.05),
               "patch_embed.proj.bias": r(c), "norm.weight": 1 + r(c, std=0.2), "norm.bias": r(c, std=0.2)}  # fmt: skip
    for i in range(layers):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            tensors |= {b + norm + ".weight": 1 + r(c, std=0.2), b + norm + ".bias": r(c, std=0.2)}
        tensors |= {b + "attn.qkv.weight": r(3 * c, c, std=c**-0.5), b + "attn.qkv.bias": r(3 * c, std=0.2), b + "attn.proj.weight": r(c, c, std=c**-0.5),
                    b + "attn.proj.bias": r(c), b + "ls1.gamma": r(c, std=0.3), b + "mlp.fc1.weight": r(4 * c, c, std=c**-0.5), b + "mlp.fc1.bias": r(4 * c),
                    b + "mlp.fc2.weight": r(c, 4 * c, std=(4 * c) ** -0.5), b + "mlp.fc2.bias": r(c), b + "ls2.gamma": r(c, std=0.3)}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architecture": "vit_large_patch14_dinov2", "num_classes": 0, "num_features": c, "global_pool": "token",
              "model_args": {"embed_dim": c, "num_heads": heads, "depth": layers, "img_size": grid * 14}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = repo / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rand(*shape, seed=0):
    """Uniform [0, 1) from its own seeded generator (tests never draw from the global RNG)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def tiny_unet(which: str) -> UNet:
    """A shared, default-initialised tiny U-Net: "sd1" or "sd2"."""
    torch.manual_seed({"sd1": 0, "sd2": 1}[which])
    return UNet({"sd1": TINY_SD1, "sd2": TINY_SD2}[which]).eval()


def load_recipe(name: str):
    """recipes/<name>.py as a module (registered in sys.modules: its dataclasses need that)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_torchrun(name: str, args: list[str], processes: int = 2, timeout: int = 300, probe: Path | None = None):
    """recipes/<name>.py under `torch.distributed.run` with `processes` gloo ranks on the CPU,
    one thread each (CUDA hidden: on a one-GPU machine two ranks would ask for cuda:1) -> the
    CompletedProcess (text stdout/stderr). With `probe`, every rank also writes its parameters at
    each checkpoint into that folder (tests/ddp_probe.py; see `assert_ranks_hold_the_same_weights`)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = [str(root / "recipes" / f"{name}.py")] if probe is None else [str(root / "tests" / "ddp_probe.py"), name, str(probe)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ranks_hold_the_same_weights(probe: Path, processes: int = 2) -> list[int]:
    """Every checkpointed step of a `run_torchrun(..., probe=...)` run: each rank's parameters equal
    rank 0's bit for bit (DDP keeps replicas identical: the same broadcast start, all-reduced
    gradients, the same optimizer arithmetic). Returns the steps compared (at least one)."""
    from safetensors.torch import load_file

    saved = sorted(p.name[len("rank0_") :] for p in probe.glob("rank0_*.safetensors"))  # <run folder>_step<s>.safetensors
    assert saved, f"no rank-0 weights in {probe}: the recipe saved no checkpoint"
    for name in saved:
        step = name[: -len(".safetensors")]
        ranks = [load_file(str(probe / f"rank{r}_{name}")) for r in range(processes)]
        for r, weights in enumerate(ranks[1:], start=1):
            assert weights.keys() == ranks[0].keys(), f"{step}: rank {r} has other parameters than rank 0"
            differ = [k for k in weights if not torch.equal(weights[k], ranks[0][k])]
            assert not differ, f"{step}: rank {r} differs from rank 0 in {len(differ)} tensors, e.g. {differ[:3]}"
    return sorted({int(name.split("_step")[-1].split(".")[0]) for name in saved})


def assert_ranks_start_from_the_same_weights(probe: Path, processes: int = 2) -> int:
    """Every model a `run_torchrun(..., probe=...)` run handed to `wrap_for_training`, as built (before
    DDP broadcasts rank 0's weights): each rank's state dict equals rank 0's bit for bit. Returns
    the number of models compared (at least one)."""
    from safetensors.torch import load_file

    names = sorted(p.name[: -len("_rank0.safetensors")] for p in probe.glob("init*_rank0.safetensors"))
    assert names, f"no initial weights in {probe}: the recipe never called wrap_for_training"
    for name in names:
        ranks = [load_file(str(probe / f"{name}_rank{r}.safetensors")) for r in range(processes)]
        for r, state in enumerate(ranks[1:], start=1):
            assert state.keys() == ranks[0].keys(), f"{name}: rank {r} has other tensors than rank 0"
            differ = [k for k in state if not torch.equal(state[k], ranks[0][k])]
            assert not differ, f"{name}: rank {r} starts from other weights than rank 0 in {len(differ)} tensors, e.g. {differ[:3]}"
    return len(names)


def rank_draws(probe: Path, rank: int) -> dict[tuple[int, int], list[dict]]:
    """{(training loop, step): [draw, ...]}: the global-RNG draws rank `rank` made in each training
    step of a `run_torchrun(..., probe=...)` run, in order (tests/ddp_probe.py)."""
    import json

    steps: dict[tuple[int, int], list[dict]] = {}
    for line in (probe / f"draws_rank{rank}.jsonl").read_text().splitlines():
        draw = json.loads(line)
        steps.setdefault((draw["run"], draw["step"]), []).append(draw)
    return steps


def compare_rank_draws(probe: Path) -> dict[str, int]:
    """Ranks 0 and 1 of a `run_torchrun(..., probe=...)` run, step by step, draw k against draw k
    (same function and dtype): how many pairs hold the same values, floating-point draws (noise) and
    integer ones (timesteps, shot counts, picks) counted apart. Two draws of one shape are the same
    when all their values are; two noise draws of different shapes (a data-dependent number of
    prompt rows, say) when their first 8 values are, as two draws of one stream from one state."""
    draws = [rank_draws(probe, r) for r in (0, 1)]
    assert draws[0] and draws[0].keys() == draws[1].keys(), f"the ranks drew in steps {[sorted(d) for d in draws]}"
    counts = dict.fromkeys(("float", "float equal", "int", "int equal"), 0)
    for step in draws[0]:
        for a, b in zip(draws[0][step], draws[1][step]):
            if (a["fn"], a["dtype"]) == (b["fn"], b["dtype"]):
                kind = "float" if a["float"] else "int"
                same = a["sha"] == b["sha"] if a["shape"] == b["shape"] else kind == "float" and len(a["head"]) == 8 and a["head"] == b["head"]
                counts[kind] += 1
                counts[f"{kind} equal"] += same
    return counts


def assert_ranks_draw_their_own_noise(probe: Path) -> dict[str, int]:
    """`compare_rank_draws`, asserting that each rank drew its own training noise: some draws are
    comparable, no floating-point draw is the same on both ranks, and the integer draws (where there
    are any) are not all the same. Returns the counts."""
    counts = compare_rank_draws(probe)
    assert counts["float"] + counts["int"] > 0, f"no comparable draws in training steps: {counts}"
    assert counts["float equal"] == 0, f"{counts['float equal']} of {counts['float']} noise draws are the same on both ranks"
    assert counts["int"] == 0 or counts["int equal"] < counts["int"], f"all {counts['int']} integer draws are the same on both ranks"
    return counts


def assert_rank_shares_cover_each_item_once(probe: Path, processes: int = 2) -> int:
    """Every evaluation split of a `run_torchrun(..., probe=...)` run (the k-th `rank_share` call
    of each rank): the ranks' items together are each item of the dataset exactly once. Returns the
    number of splits checked (at least one: a recipe that evaluates without `rank_share` fails)."""
    import json

    calls = [[json.loads(line) for line in (probe / f"shares_rank{r}.jsonl").read_text().splitlines()] for r in range(processes)]
    assert calls[0] and all(len(c) == len(calls[0]) for c in calls), f"ranks split {[len(c) for c in calls]} datasets"
    for k, shares in enumerate(zip(*calls)):
        n = shares[0]["len"]
        items = sorted(i for share in shares for i in share["indices"])
        assert all(s["len"] == n for s in shares) and items == list(range(n)), f"split {k}: {shares}"
    return len(calls[0])


@contextlib.contextmanager
def keeping_checkpoints(main, out: Path, kept: Path):
    """While it lasts, each checkpoint that the recipe of `main` writes under `out` is copied, as
    soon as it is written, to the same place under `kept`: a finished demo deletes its earlier
    checkpoints, and a test that resumes from one of them (as an interrupted run would) keeps it."""
    module = main.__globals__  # the recipe's namespace: it imports save_checkpoint by name
    real = module["save_checkpoint"]

    def save_checkpoint(directory, step, *args, **kwargs):
        path = real(directory, step, *args, **kwargs)
        copy = kept / Path(path).resolve().relative_to(Path(out).resolve())
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
        return path

    module["save_checkpoint"] = save_checkpoint
    try:
        yield kept
    finally:
        module["save_checkpoint"] = real


def straight_and_resumed(main, args: list[str], tmp_path: Path, straight_only: list[str] = (), run_dir: str = ""):
    """Run a recipe's `main` for 2 steps (`args` must save every step), then again from only its
    step-1 checkpoint (kept as it was written: a finished demo deletes it) with --resume -> the
    tensors of both step-2 checkpoints (straight, resumed). `straight_only`: extra options of the
    straight run (e.g. a periodic evaluation that must not perturb training); `run_dir`: where the
    recipe keeps the checkpoints under --out."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from unet_seg.train import checkpoint_path

    straight, split = tmp_path / "straight", tmp_path / "split"
    with keeping_checkpoints(main, straight, tmp_path / "kept") as kept:
        main(args + list(straight_only) + ["--out", str(straight)])
    (split / run_dir).mkdir(parents=True)  # an interrupted run: only its step-1 checkpoint exists
    shutil.copy(checkpoint_path(kept / run_dir, 1), split / run_dir)
    main(args + ["--out", str(split), "--resume"])
    return tuple(load_file(str(checkpoint_path(d / run_dir, 2))) for d in (straight, split))


def assert_resume_is_exact(main, args: list[str], tmp_path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """`straight_and_resumed(main, args, tmp_path, **kwargs)`, asserting that both step-2
    checkpoints hold the same tensors bit for bit -> the straight run's tensors."""
    straight, resumed = straight_and_resumed(main, args, tmp_path, **kwargs)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    return straight


def run_two_gloo_processes(name: str, args: list[str], tmp_path: Path, grid: str = "predictions.png", timeout: int = 300,
                           run_dir: str = ""):  # fmt: skip
    """recipes/<name>.py with `args` on 2 gloo ranks (`run_torchrun` with the probe; output in
    tmp_path/run), asserting what every recipe's 2-process run must show: exit status 0, both ranks
    starting from identical weights and holding identical weights at steps 1 and 2, each rank
    drawing its own training noise (`assert_ranks_draw_their_own_noise`), every evaluated item on
    exactly one rank, one DEMO line (rank 0 prints), "on 2 process(es)", metrics.json and the `grid`
    image written. Then again from only the step-1 checkpoint (in `run_dir` under --out; the
    probe keeps a copy: the finished demo deletes it) with
    --resume: the step-2 checkpoint equals the first run's bit for bit and each rank draws in step 2
    exactly what it drew the first time (in the first training loop, where a recipe trains several
models). -> (the first CompletedProcess, the draw counts)."""
    run = run_torchrun(name, args + ["--out", str(tmp_path / "run")], timeout=timeout, probe=tmp_path / "probe")
    assert run.returncode == 0, run.stderr[-3000:]
    assert assert_ranks_start_from_the_same_weights(tmp_path / "probe") >= 1
    assert assert_ranks_hold_the_same_weights(tmp_path / "probe") == [1, 2]
    counts = assert_ranks_draw_their_own_noise(tmp_path / "probe")
    assert assert_rank_shares_cover_each_item_once(tmp_path / "probe") >= 1
    assert sum(line.startswith("DEMO:") for line in run.stdout.splitlines()) == 1  # printed by rank 0 only
    assert "on 2 process(es)" in run.stdout
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / grid).is_file()

    from safetensors import safe_open
    from safetensors.torch import load_file

    from unet_seg.train import checkpoint_path

    straight, split = tmp_path / "run" / run_dir, tmp_path / "split" / run_dir
    split.mkdir(parents=True)  # an interrupted run: only its step-1 checkpoint exists (the probe kept it)
    shutil.copy(checkpoint_path(tmp_path / "probe" / "checkpoints" / straight.name, 1), split)
    resumed = run_torchrun(name, args + ["--out", str(tmp_path / "split"), "--resume"], timeout=timeout, probe=tmp_path / "probe_resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for r in (0, 1):
        first, again = rank_draws(tmp_path / "probe", r), rank_draws(tmp_path / "probe_resumed", r)
        assert next(iter(again)) == (0, 2) and again[0, 2] == first[0, 2], f"rank {r} drew other values in step 2 after --resume"
    a, b = (load_file(str(checkpoint_path(d, 2))) for d in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed step-2 checkpoint differs"
    rng = [json.loads(safe_open(str(checkpoint_path(d, 2)), "pt").metadata()["state"])["rng"] for d in (straight, split)]
    assert len(rng[0]) == 2 and rng[0] == rng[1], "the ranks' RNG states after step 2 differ from the uninterrupted run's"
    return run, counts


def assert_graph_follows_eager(eager_step, graph_step, eager_model, graphed_model, step_inputs, optimizers=None) -> None:
    """For each inputs tuple of `step_inputs`, the eager step and the `CudaGraphStep` from the same
    CUDA seed give the same outputs (loss, or loss and terms) and leave the same weights. With
    `optimizers` (eager, graphed), each step starts the graphed model from the eager one's state
    (weights, buffers, optimiser state): for a step whose loss is discontinuous in the weights."""
    for i, inputs in enumerate(step_inputs):
        if optimizers is not None and i > 0:
            copy_training_state(eager_model, graphed_model, *optimizers)
        torch.cuda.manual_seed(100 + i)
        eager = eager_step(*inputs)
        torch.cuda.manual_seed(100 + i)
        graphed = graph_step(*inputs)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=0)
        for p, q in zip(graphed_model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def copy_training_state(source: torch.nn.Module, target: torch.nn.Module, source_opt, target_opt) -> None:
    """`source`'s parameters, buffers and optimiser state into `target`'s tensors, in place (a
    CUDA graph reads them where they are)."""
    for t, s in zip((*target.parameters(), *target.buffers()), (*source.parameters(), *source.buffers())):
        t.copy_(s)
    for t, s in zip(target.parameters(), source.parameters()):
        for key, value in source_opt.state[s].items():
            target_opt.state[t][key].copy_(value)
