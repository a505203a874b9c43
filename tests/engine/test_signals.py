"""Signals to the whole job (issue 13): Ctrl-C / SIGTERM / SIGUSR1 sent to the process group, DataLoader
workers included (``--workers 2``), stop training cleanly: one line on stderr, no traceback, exit code 0 (130
for Ctrl-C), a loadable checkpoint and ``model_last.pth``. A second signal exits at once; a signal during an
evaluation stops right after it; DDP ranks agree on the stop iteration."""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cli_utils import cli_command
from focus_detr import api
from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine.checkpoint import list_checkpoints, load_checkpoint
from focus_detr.engine.logging import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_signals")
    ensure_shapes_dataset(root, 8, 40, seed=3, image_size=(80, 96), min_object_size=8, objects_per_image=(1, 3))
    return root


def _train_args(data_dir: Path, out: Path, *extra: str, iters: int = 400) -> list[str]:
    return [*cli_command(), "train", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--schedule",
            "none", "--max-iters", str(iters), "--batch-size", "2", "--workers", "2", "--train-scales", "80",
            "--max-size", "160", "--checkpoint-every", "1000", "--log-every", "1", "--threads", "1",
            "--no-tensorboard", "--set", "decoder.num_queries=20", "--set", "encoder.oesm_topk=20",
            "--set", "test_short_side=80", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(args: list[str]) -> subprocess.Popen:
    # A session of its own: os.killpg reaches the command and its DataLoader workers, as a terminal or a
    # scheduler would.
    return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_training(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"type": "train"' in metrics.read_text():
            return
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    pytest.fail(f"training did not start (exit {proc.poll()}): {err[-2000:]}")


def _check_clean_stop(proc: subprocess.Popen, out: Path, sig: signal.Signals, expected_code: int) -> int:
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == expected_code, stderr[-3000:]
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    match = re.fullmatch(rf"stopped by {sig.name} at iteration (\d+) of 400: checkpoint (\S+), weights (\S+); "
                         r"continue with --resume auto", lines[0])
    assert match, lines[0]
    iteration = int(match.group(1))
    assert Path(match.group(2)) == out / "checkpoints" / f"checkpoint_{iteration:07d}.pth"
    assert [it for it, _ in list_checkpoints(out)] == [iteration]
    assert load_checkpoint(match.group(2))["iteration"] == iteration
    last = api.read_weights_file(out / "model_last.pth")
    assert last["extra"]["iteration"] == iteration and last["extra"]["stop_reason"] == "signal"
    assert not (out / "model_final.pth").exists() and not (out / ".lock").exists()
    assert lines[0] in (out / "log.txt").read_text()  # the line is also in the run's log
    return iteration


@pytest.mark.parametrize("sig,code,rounds", [(signal.SIGTERM, 0, 2), (signal.SIGINT, 130, 2), (signal.SIGUSR1, 0, 1)],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_to_process_group_checkpoints_and_exits(data_dir, tmp_path, sig, code, rounds):
    rng = random.Random(int(sig))
    for attempt in range(rounds):  # at random moments of a step: races between workers and main process
        out = tmp_path / f"run{attempt}"
        proc = _start(_train_args(data_dir, out, "--val-split", "none"))
        _wait_for_training(proc, out)
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(proc.pid, sig)
        _check_clean_stop(proc, out, sig, code)
    # The weights left behind work with predict (the file format of api.save).
    pred = subprocess.run([*cli_command(), "predict", str(out / "model_last.pth"), str(data_dir / "images" / "val"),
                           "--out", str(tmp_path / "pred"), "--no-draw", "--quiet"], env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert len(json.loads((tmp_path / "pred" / "images.json").read_text())["images"]) == 40


def test_signal_during_evaluation_stops_right_after_it(data_dir, tmp_path):
    out = tmp_path / "run"
    # 16 validation images: the evaluation at iteration 2 lasts long enough to be signalled in.
    proc = _start(_train_args(data_dir, out, "--eval-every", "2", "--log-every", "2", "--max-eval-images", "16"))
    assert proc.stdout is not None
    for line in proc.stdout:  # the progress line of iteration 2 comes right before its evaluation
        if line.startswith("iter 2/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    iteration = _check_clean_stop(proc, out, signal.SIGINT, 130)
    assert iteration == 2  # no further step after the evaluation
    assert (out / "eval" / "iter_0000002" / "metrics.json").is_file()
    assert (out / "model_best.pth").is_file()
    events = [r.get("event") for r in read_metrics(out / "metrics.jsonl") if r["type"] == "event"]
    assert events[-2:] == ["signal", "stopped"]


def test_second_signal_exits_at_once(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _start(_train_args(data_dir, out, "--eval-every", "2", "--log-every", "2"))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("iter 2/"):
            break
    # The first signal arrives during the evaluation, which goes on for seconds: time for the second.
    # (Two signals sent back to back would merge into one pending signal.)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert not (out / "eval" / "iter_0000002" / "metrics.json").exists()  # it did not wait for the evaluation
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert time.monotonic() - start < 20
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("second signal (SIGTERM): exiting at once"), stderr
    assert not (out / ".lock").exists()  # released on the way out


# ---- DDP: every rank stops at the same iteration ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, port: int, data_dir: str, out: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")  # as under torchrun
    torch.set_num_threads(1)
    train_module = importlib.import_module("focus_detr.engine.train")
    from train_utils import small_train_config

    (Path(result_dir) / f"started{rank}").write_text(str(os.getpid()))
    result = train_module.train(small_train_config(data_dir, out, max_iters=400, batch_size=1, num_workers=2,
                                                   device="cpu", dist_timeout_s=60.0))
    (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"iteration": result.iteration, "reason": result.stop_reason, "signal": result.stop_signal}))


def test_ddp_ranks_agree_on_the_stop_iteration(data_dir, tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.fail("torch.distributed with gloo is part of every CPU build we support")
    ctx = mp.get_context("spawn")
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(data_dir), str(out), str(results))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and '"type": "train"' in metrics.read_text()):
        assert all(p.is_alive() for p in procs), [p.exitcode for p in procs]
        time.sleep(0.02)
    # The job's SIGTERM reaches rank 1 only, then rank 0 twice (the job's copy and torchrun's forwarded
    # one): the repeat does not count as a second signal, and both ranks stop together.
    os.kill(procs[1].pid, signal.SIGTERM)
    os.kill(procs[0].pid, signal.SIGTERM)
    os.kill(procs[0].pid, signal.SIGTERM)
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((results / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1 and r0["reason"] == "signal" and r0["signal"] == signal.SIGTERM, (r0, r1)
    assert [it for it, _ in list_checkpoints(out)] == [r0["iteration"]]
    assert len(load_checkpoint(list_checkpoints(out)[0][1])["rng"]) == 2  # both ranks' states
