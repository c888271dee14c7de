"""How long `load_sd` takes on a full SD 2.1-sized checkpoint from local files, and its peak RSS.

    python benchmarks/bench_load.py --workdir /tmp/sd21-random

Writes random weights once (diffusers folder + original single file, fp32, ~5.2 GB each), then
loads each in a fresh process and reports wall time and peak resident memory next to the
size of the weights: peak RSS near 1x the weights means no second copy was held.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet_seg import ldm  # noqa: E402
from unet_seg.hub_config import text_to_transformers, unet_to_diffusers, vae_to_diffusers  # noqa: E402
from unet_seg.models import SD2_TEXT, SD21, SD_VAE, AutoencoderKL, CLIPTextEncoder, UNet  # noqa: E402

LOAD = """
import resource, sys, time, torch
from unet_seg import load_sd
start = time.perf_counter()
sd = load_sd(sys.argv[1], components=["unet", "vae", "text_encoder"])
seconds = time.perf_counter() - start
n = sum(p.numel() * p.element_size() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
print(seconds, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write(workdir: Path) -> None:
    if (workdir / "single.safetensors").is_file():
        return
    with torch.device("meta"):
        models = {"unet": UNet(SD21), "vae": AutoencoderKL(SD_VAE), "text_encoder": CLIPTextEncoder(SD2_TEXT)}
    sds = {k: {n: torch.randn(p.shape) * 0.02 for n, p in m.state_dict().items()} for k, m in models.items()}
    for name, sd in sds.items():
        (workdir / name).mkdir(parents=True, exist_ok=True)
        weights = "model" if name == "text_encoder" else "diffusion_pytorch_model"
        save_file(sd, workdir / name / f"{weights}.safetensors")
    (workdir / "unet" / "config.json").write_text(json.dumps(unet_to_diffusers(SD21)))
    (workdir / "vae" / "config.json").write_text(json.dumps(vae_to_diffusers(SD_VAE)))
    (workdir / "text_encoder" / "config.json").write_text(json.dumps(text_to_transformers(SD2_TEXT)))
    (workdir / "scheduler").mkdir(exist_ok=True)
    (workdir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"})
    )
    (workdir / "model_index.json").write_text("{}")
    single = ldm.to_ldm(sds["unet"], sds["vae"], sds["text_encoder"], SD21, SD_VAE, openclip=True)
    save_file({k: v.contiguous() for k, v in single.items()}, workdir / "single.safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/sd21-random")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write(workdir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 weights, page cache warm after the first load\n")
    print("| source | load s | weights GB | peak RSS GB | RSS / weights |\n|---|---|---|---|---|")
    for label, src in [("diffusers folder", workdir), ("single file", workdir / "single.safetensors")]:
        for _ in range(2):  # the second run reads from the page cache
            out = subprocess.run([sys.executable, "-c", LOAD, str(src)], capture_output=True, text=True, check=True)
        seconds, n, rss = map(float, out.stdout.split())
        print(f"| {label} | {seconds:.1f} | {n / 1e9:.2f} | {rss / 1e9:.2f} | {rss / n:.2f} |")


if __name__ == "__main__":
    main()
