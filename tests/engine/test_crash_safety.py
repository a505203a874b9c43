"""Crash safety: a real training process killed with SIGKILL at random moments (mid-step, mid-checkpoint
write, mid-evaluation) always leaves a loadable checkpoint, and ``--resume auto`` finishes with exactly the
parameters of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from focus_detr import api
from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine.checkpoint import list_checkpoints, load_checkpoint

ITERS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_kill")
    ensure_shapes_dataset(root, 8, 2, seed=7, image_size=(80, 96), min_object_size=8, objects_per_image=(1, 3))
    return root


def _command(data_dir: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "focus_detr.cli.main", "train", "--preset", "tiny", "--data", str(data_dir),
           "--out", str(out), "--max-iters", str(ITERS), "--schedule", "none", "--lr-steps", "6", "--batch-size", "2",
           "--workers", "0", "--seed", "11", "--lr", "2e-4", "--backbone-lr", "2e-4", "--train-scales", "80,96",
           "--max-size", "160", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--eval-every", "4", "--max-eval-images", "2",
           "--deterministic", "--threads", "1", "--no-progress", "--no-tensorboard",
           "--set", "decoder.num_queries=20", "--set", "encoder.oesm_topk=20", "--set", "test_short_side=80"]
    if resume:
        cmd += ["--resume", "auto"]
    return cmd


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _final_state(out: Path) -> dict:
    return api.read_weights_file(out / "model_final.pth")["state_dict"]


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(data_dir, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(_command(data_dir, reference, resume=False), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = _final_state(reference)
    # Seconds per training step, from the reference run's checkpoint times (start-up excluded).
    stamps = sorted(p.stat().st_mtime for _, p in list_checkpoints(reference))
    step_seconds = max(0.05, (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)) if len(stamps) > 1 else 0.5

    rng = random.Random(1234)
    kills_after_progress = 0
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        # Kill up to three times at random moments, then let the resumed run finish.
        kills = 0
        log = []
        for attempt in range(4):
            proc = subprocess.Popen(_command(data_dir, out, resume=attempt > 0), env=_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if attempt < 3:
                # Wait until the run has passed a random iteration, then kill at a random moment of the next
                # step (which may fall in the forward/backward pass, a checkpoint write or an evaluation).
                done_iters = max([it for it, _ in list_checkpoints(out)], default=0)
                target = rng.randint(done_iters + 1, ITERS - 2) if done_iters + 1 < ITERS - 1 else ITERS
                while proc.poll() is None and max([it for it, _ in list_checkpoints(out)], default=0) < target:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.5 * step_seconds))
            try:
                proc.wait(timeout=0.01 if attempt < 3 else 600)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                kills += 1
                # Whatever was being written, every checkpoint left must be complete and loadable.
                left = list_checkpoints(out)
                for _, path in left:
                    load_checkpoint(path)
                kills_after_progress += bool(left) and left[-1][0] < ITERS
                log.append(f"kill {kills}: checkpoints {[it for it, _ in left]}")
                continue
            stderr = proc.stderr.read() if proc.stderr else ""
            assert proc.returncode == 0, stderr[-2000:]
            break
        else:
            pytest.fail(f"trial {trial}: the run never finished after {attempt + 1} attempts")
        state = _final_state(out)
        assert state.keys() == expected.keys()
        different = [k for k in state if not torch.equal(state[k], expected[k])]
        assert not different, f"trial {trial} ({log}): {len(different)} tensors differ, e.g. {different[:3]}"
    # The kills must have interrupted real training, not only process start-up.
    assert kills_after_progress >= 2, kills_after_progress
