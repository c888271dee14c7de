"""DiGSeg (recipes/digseg_ade20k.py) inference speed on one GPU: images/s for the paper's E×S settings.

    python benchmarks/bench_digseg.py                                   # CUDA, SD2.1 + SD VAE + CLIP ViT-L/14, 512²
    python benchmarks/bench_digseg.py --tiny --device cpu --iters 1     # smoke test of the script itself

One image = CLIP ViT-L/14 candidate selection (224², global + patch scores against 150 cached
class embeddings, A.3), then for K candidate classes `unet_seg.segmentation.denoise_class_masks` (VAE
encode of the image; E seeds × S DDIM-trailing steps of the denoiser, batched over K·E; mean of the
E latents; VAE decode of K latents) and `candidates_to_labels` (argmax, background below τ). Random weights,
so CLIP's selection is timed but K is fixed by `--classes` (the paper does not say how many
candidates its FPS assumes; ADE20K images hold 8–9 classes on average). The denoiser and the VAE
in bf16, channels_last; the denoiser compiled (`--mode`), the VAE and CLIP eager unless --compile-all.
The paper's Table 6 (8 × A100, per-image FPS, K not given): 1×1 11.27, 1×2 10.61, 4×5 5.82, 8×2 3.15.

The recipe denoises the K classes of an image together (one VAE encode of the image, its latent
shared by the K·E runs of each denoiser call, one decode of K latents); "per-class loop" runs
`denoise_class_masks` once per class instead (K encodes, K·S denoiser calls of E, K decodes).
The two are timed in interleaved rounds (A B B A ...): median of the segment medians (min–max).
"first call" is the seconds of the first call of each, which compiles (cold on a fresh machine;
`--compile-only` in a second process gives the warm on-disk-cache time of the first setting).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import device_name, file_tag, first_call, interleaved, load_recipe, spread, timed, write_table  # noqa: E402

from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.models import SD21, SD_VAE, TINY_SD2, TINY_VAE, AutoencoderKL, UNet  # noqa: E402
from unet_seg.models.clip_vision import TINY_VIT, VIT_L14, CLIPVisionEncoder  # noqa: E402
from unet_seg.segmentation import candidates_to_labels, clip_candidates, denoise_class_masks  # noqa: E402

PAPER_FPS = {(1, 1): 11.27, (1, 2): 10.61, (4, 5): 5.82, (8, 2): 3.15}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="1x1,1x2,4x5,8x2", help="E×S: ensemble members × DDIM-trailing steps")
    p.add_argument("--classes", default="1,8,16", help="K, candidate classes denoised per image")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iters", type=int, default=3, help="calls per timed segment")
    p.add_argument("--rounds", type=int, default=4, help="segments per variant, interleaved")
    p.add_argument("--compile-only", action="store_true", help="only the first call of the first K and setting")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-all", action="store_true", help="also compile the VAE encoder/decoder and the CLIP tower")
    p.add_argument("--mode", default="default", help="torch.compile mode of the denoiser (reduce-overhead: CUDA graphs)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    recipe, device = load_recipe("digseg_ade20k"), args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU smoke test: no autocast there
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True

    unet = UNet(TINY_SD2 if args.tiny else SD21).widen_conv_in(8)
    text_dim, vocabulary = (32 if args.tiny else 768), 150  # CLIP ViT-L/14 text embeddings, ADE20K-150
    null_context = torch.randn(1, 77, unet.config.context_dim)
    model = recipe.DiGSeg(unet, text_dim, null_context).to(device, dtype).eval()
    vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(device, dtype).eval()
    clip = CLIPVisionEncoder(TINY_VIT if args.tiny else VIT_L14).to(device, dtype).eval()
    class_embeds = torch.nn.functional.normalize(torch.randn(vocabulary, clip.config.projection_dim, device=device), dim=-1)
    text_embeds = torch.nn.functional.normalize(torch.randn(vocabulary, text_dim, device=device), dim=-1)
    if device == "cuda":
        for m in (model, vae):
            m.to(memory_format=torch.channels_last)
    compiled = not args.no_compile
    forward = torch.compile(model, mode=args.mode) if compiled else model
    if args.compile_all:
        for m in (vae.encoder, vae.decoder, clip):
            m.compile()
    schedule = NoiseSchedule.sd("v_prediction")
    image = torch.rand(1, 3, args.size, args.size, device=device) * 2 - 1
    class_ids = torch.arange(vocabulary, device=device)

    def one_image(k: int, e: int, s: int, per_class: bool = False):
        with torch.no_grad():
            clip_candidates(clip, image, class_embeds)  # timed; K fixed below (random weights)
            candidates = torch.arange(k, device=device)
            if per_class:
                prob = torch.cat([denoise_class_masks(forward, vae, schedule, image, text_embeds[c : c + 1], e, s)
                                  for c in range(k)], dim=1)  # fmt: skip
            else:
                prob = denoise_class_masks(forward, vae, schedule, image, text_embeds[candidates], e, s)
            return candidates_to_labels(prob, candidates, class_ids, vocabulary, threshold=0.7)

    name = device_name(device)
    classes, settings = [int(x) for x in args.classes.split(",")], [tuple(int(x) for x in st.split("x")) for st in args.settings.split(",")]
    if args.compile_only:
        (e, s), k = settings[0], classes[0]
        seconds = first_call(lambda: one_image(k, e, s), device)
        table = (f"# DiGSeg first call (compile), second process — {name}\n\n{datetime.date.today()} · torch {torch.__version__} · "
                 f"denoiser {'compiled (' + args.mode + ')' if compiled else 'eager'}, VAE and CLIP {'compiled' if args.compile_all else 'eager'}\n\n"
                 f"| K | E×S | first call s |\n|---|---|---|\n| {k} | {e}×{s} | {seconds:.1f} |\n")
        write_table(table, args.out, f"digseg_compile_{file_tag(name)}", args.tiny)
        return
    header = (
        f"## DiGSeg inference, {name}, {'tiny configs' if args.tiny else 'SD2.1 U-Net (conv_in 8) + SD VAE + CLIP ViT-L/14'}, "
        f"{args.size}², bf16, denoiser {f'compiled ({args.mode})' if compiled else 'eager'}, "
        f"VAE and CLIP {'compiled' if args.compile_all else 'eager'}, "
        f"batch 1 image, {datetime.date.today()}, torch {torch.__version__}; variants interleaved in {args.rounds} segments "
        f"of {args.iters} calls\n\n"
        "| K classes | E×S | variant | U-Net calls (batch) | ms / image (min–max) | images/s | vs loop | paper FPS (Table 6) | first call s |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    print(header, flush=True)
    clip_ms = timed(lambda: clip_candidates(clip, image, class_embeds), 5, 2, device)
    print(f"CLIP candidate selection alone: {clip_ms:.1f} ms", flush=True)
    for k in classes:
        for e, s in settings:
            fns = {"batched (recipe)": lambda k=k, e=e, s=s: one_image(k, e, s)}
            if k > 1:
                fns["per-class loop"] = lambda k=k, e=e, s=s: one_image(k, e, s, per_class=True)
            firsts = {v: first_call(fn, device) for v, fn in fns.items()}  # compiles for these batch sizes
            segments = interleaved(fns, args.rounds, args.iters, 1, device)
            loop = statistics.median(segments["per-class loop"]) if k > 1 else None
            calls = {"batched (recipe)": f"{s} ({k * e})", "per-class loop": f"{k * s} ({e})"}
            for v, seg in segments.items():
                ms = statistics.median(seg)
                ratio = f"{loop / ms:.2f}×" if loop else ""
                rows.append(f"| {k} | {e}×{s} | {v} | {calls[v]} | {spread(seg)} | {1e3 / ms:.2f} | {ratio} | "
                            f"{PAPER_FPS.get((e, s), '')} | {firsts[v]:.0f} |")  # fmt: skip
                print(rows[-1], flush=True)
    table = header + "\n" + "\n".join(rows) + f"\n\nCLIP ViT-L/14 candidate selection alone: {clip_ms:.1f} ms per image (included above).\n"
    tag = ("_all_compiled" if args.compile_all else "") + ("" if args.mode == "default" else f"_{file_tag(args.mode)}")
    write_table(table, args.out, f"digseg_{file_tag(name)}{tag}", args.tiny)


if __name__ == "__main__":
    main()
