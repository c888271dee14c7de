"""`python -m unet_seg`: runs with no arguments, writes its PNG where it says, in a git-ignored folder."""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_main(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unet_seg", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_no_arguments_writes_the_demo_png_into_the_ignored_runs_folder_and_names_it(tmp_path):
    run = run_main([], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    png = tmp_path / "runs" / "unet_seg_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.stdout.splitlines()[0].startswith("DEMO:") and run.stdout.splitlines()[-1] == f"wrote {png}"
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_out_is_where_the_png_goes(tmp_path):
    out = tmp_path / "a" / "b.png"
    run = run_main(["--out", str(out), "--size", "72"], tmp_path)  # 9×9 latents: odd sides all the way down
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.is_file() and run.stdout.splitlines()[-1] == f"wrote {out}" and not (tmp_path / "runs").exists()


def test_usage_and_path_errors_are_one_line(tmp_path):
    """Usage errors before torch is imported (seconds); a mistyped --model: one line, not a traceback."""
    probe = "import runpy, sys; sys.argv = ['unet_seg', '--size', '68']\ntry:\n    runpy.run_module('unet_seg', run_name='__main__')\n" \
            "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "--size must be a positive multiple of 8" in run.stderr
    assert "torch imported: False" in run.stderr
    run = run_main(["--model", "./no_such_model"], tmp_path)
    assert run.returncode == 1 and run.stderr.strip() == "python -m unet_seg: error: no such file or folder: ./no_such_model"


def test_a_missing_or_unreadable_image_is_one_line_before_torch_is_imported(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (64, 48)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])  # a header, then nothing
    probe = "import runpy, sys; sys.argv = ['unet_seg', '--image', sys.argv[1]]\ntry:\n    runpy.run_module('unet_seg', run_name='__main__')\n" \
            "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"  # fmt: skip
    for name, message in [("missing.png", "no such file"), ("notes.png", "not an image (cannot identify image file")]:
        run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / name)], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 2 and f"error: --image {tmp_path / name}: {message}" in run.stderr, run.stderr
        assert run.stderr.splitlines()[-1] == "torch imported: False"
    run = run_main(["--image", str(tmp_path / "cut.png")], tmp_path)
    assert run.returncode == 1 and run.stderr.strip().startswith(f"python -m unet_seg: error: --image {tmp_path / 'cut.png'}: not a readable image")
    assert len(run.stderr.strip().splitlines()) == 1
