"""Training-side reliability: Ctrl-C (SIGINT) checkpoints and exits cleanly (code 130); a bad training image stops the run
with an error naming it unless ``--skip-bad`` turns it into a counted warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine.checkpoint import list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_rel")
    ensure_shapes_dataset(root, 6, 2, seed=2, image_size=(80, 96), min_object_size=8, objects_per_image=(1, 3))
    return root


def _train(data_dir: Path, out: Path, iters: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "focus_detr.cli.main", "train", "--preset", "tiny", "--data", str(data_dir),
            "--out", str(out), "--max-iters", str(iters), "--schedule", "none", "--batch-size", "2", "--workers", "0",
            "--train-scales", "80", "--max-size", "160", "--val-split", "none", "--checkpoint-every", "1000",
            "--log-every", "1", "--threads", "1", "--no-progress", "--no-tensorboard",
            "--set", "decoder.num_queries=20", "--set", "encoder.oesm_topk=20", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sigint_checkpoints_and_exits_cleanly(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(data_dir, out, 500), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"type": "train"' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-2000:]  # the shell's code for Ctrl-C, after a clean stop
    checkpoints = list_checkpoints(out)
    assert checkpoints, output[-2000:]
    iteration, path = checkpoints[-1]
    assert 0 < iteration < 500
    assert load_checkpoint(path)["iteration"] == iteration
    assert not (out / "model_final.pth").exists()  # stopped early: no final weights, resumable instead


def test_bad_training_image_fails_or_is_skipped(data_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    victim = sorted((broken / "images" / "train").iterdir())[0]
    victim.write_bytes(b"this is not an image")

    failed = subprocess.run(_train(broken, tmp_path / "strict", 6), env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode != 0
    assert victim.name in failed.stderr
    assert "Traceback" not in failed.stderr

    skipped = subprocess.run(_train(broken, tmp_path / "lenient", 6, "--skip-bad"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert victim.name in skipped.stderr  # the warning names the skipped file
    assert (tmp_path / "lenient" / "model_final.pth").exists()
