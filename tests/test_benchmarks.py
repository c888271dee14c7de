"""The benchmark scripts still run: each one's CPU smoke test (tiny configs, one or two timed
calls) exits 0 and writes its markdown table. No timing is asserted; they catch a script broken by
a library change (as `bench_diff.py` was once, by the recipes' stricter `--data-root` check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CPU = ["--tiny", "--device", "cpu"]
SMOKE = {
    "bench_diff.py": CPU + ["--modes", "eager", "--iters", "1", "--rounds", "1"],
    "bench_digseg.py": CPU + ["--no-compile", "--iters", "1", "--rounds", "1", "--classes", "1,2", "--settings", "1x1", "--size", "64"],
    "bench_models.py": CPU + ["--modes", "eager", "--batches", "1", "--iters", "1", "--rounds", "2", "--models", "unet-sd21,vae-encode", "--size", "64"],
    "bench_diffews.py": CPU + ["--eager", "--shots", "1", "--train-batches", "1", "--iters", "1", "--rounds", "2", "--batch", "2", "--size", "64"],
    "bench_querydiff.py": CPU + ["--modes", "eager", "--iters", "1", "--rounds", "1"],
    "bench_gpu_hours.py": CPU + ["--iters", "1", "--rounds", "1", "--size", "64", "--eval"],
    "bench_matching.py": CPU + ["--iters", "2", "--rounds", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run_writes_its_table(script, tmp_path):
    if script == "bench_models.py":
        pytest.importorskip("diffusers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *SMOKE[script], "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    tables = list(tmp_path.glob("*_tiny.md"))
    assert tables and all("|" in t.read_text() for t in tables), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.slow
def test_ddp_benchmark_runs_on_one_and_two_processes_and_compares_them(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = str(BENCHMARKS / "bench_diffews_ddp.py")
    tiny = ["--tiny", "--steps", "1", "--warmup", "0", "--eval-items", "4", "--size", "64", "--out", str(tmp_path)]
    for world in (1, 2):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", script, *tiny],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, script, "--compare", str(tmp_path), "--tiny"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in (tmp_path / "diffews_ddp_tiny.md").read_text().splitlines() if line.startswith("| – |")]
    assert len(rows) == 2 and all("| yes | yes |" in row for row in rows)  # both world sizes evaluate identically
