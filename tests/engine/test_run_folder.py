"""The run folder's rules (issues 12 and 13), end to end through the console script: an existing run is
refused unless --resume / --overwrite; a folder in use is locked (a stale lock is taken over); leftovers of
killed writers are removed at the next start; a full or read-only disk gives one line naming the last good
checkpoint; unwritable --out folders fail before the work; log.txt without progress-bar redraws; lr and
lr_backbone logged as given; model_best.pth and --patience; predict interrupted keeps its results."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cli_utils import cli_command
from focus_detr import api
from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine.checkpoint import list_checkpoints, load_checkpoint
from focus_detr.engine.logging import read_metrics
from focus_detr.engine.run_dir import RunLock

HERE = Path(__file__).resolve().parents[1]  # tests/: fake_full_disk.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_runs")
    ensure_shapes_dataset(root, 6, 4, seed=5, image_size=(80, 96), min_object_size=8, objects_per_image=(1, 3))
    return root


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _train_args(data_dir: Path, out: Path, iters: int, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--schedule", "none",
            "--max-iters", str(iters), "--batch-size", "2", "--workers", "0", "--train-scales", "80",
            "--max-size", "160", "--val-split", "none", "--log-every", "1", "--threads", "1", "--no-tensorboard",
            "--set", "decoder.num_queries=20", "--set", "encoder.oesm_topk=20", "--set", "test_short_side=80", *extra]


def _run(args: list[str], prefix: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run((prefix or cli_command()) + args, env=_env(), capture_output=True, text=True,
                          timeout=300, **kw)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_existing_run_refused_resumed_overwritten_and_orphans_removed(data_dir, tmp_path):
    out = tmp_path / "run"
    first = _run(_train_args(data_dir, out, 2, "--checkpoint-every", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    rows_before = (out / "metrics.jsonl").read_text()

    again = _run(_train_args(data_dir, out, 2))
    assert again.returncode == 2
    line = _one_error_line(again)
    assert str(out) in line and "--resume auto" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == rows_before  # nothing appended, nothing overwritten

    # A writer killed mid-save leaves temporary files; the next start removes them (the run holds the lock).
    orphans = [out / "checkpoints" / ".checkpoint_0000003.pth.tmp-4242", out / ".model_final.pth.tmp-4242",
               out / "model_final.pth.tmp"]
    for path in orphans:
        path.write_bytes(b"x" * 1000)
    resumed = _run(_train_args(data_dir, out, 3, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "removed 3 unfinished temporary file(s)" in resumed.stdout
    assert not any(p.exists() for p in orphans)
    assert "resuming at iteration 2" in resumed.stdout and "done: 3 iterations" in resumed.stdout
    assert not (out / ".lock").exists()

    replaced = _run(_train_args(data_dir, out, 1, "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "--overwrite: removed the previous run's" in replaced.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["event"] for r in rows if r["type"] == "event"] == ["start", "done"]
    assert [it for it, _ in list_checkpoints(out)] == [1]
    log = (out / "log.txt").read_text()
    assert "done: 1 iterations" in log and "resuming" not in log  # the old run's log went with it

    both = _run(_train_args(data_dir, out, 1, "--overwrite", "--resume", "auto"))
    assert both.returncode == 2 and "give one of them" in _one_error_line(both)


def test_locked_folder_refused_naming_the_holder_and_stale_lock_taken_over(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # A live holder on this host (this test process) ...
    holder = RunLock(out)
    holder.acquire()
    try:
        refused = _run(_train_args(data_dir, out, 1))
    finally:
        holder.release()
    assert refused.returncode == 2
    line = _one_error_line(refused)
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in line and "in use by another run" in line
    assert not list_checkpoints(out) and not (out / "metrics.jsonl").exists()

    # ... or on another machine (which we cannot check): refused too.
    (out / ".lock").write_text(json.dumps({"pid": 1234, "host": "node-17", "started": "2026-01-01 00:00:00"}))
    other = _run(_train_args(data_dir, out, 1))
    assert other.returncode == 2 and "PID 1234 on host node-17" in _one_error_line(other)

    # A lock left by a process that is gone (killed with SIGKILL) is taken over with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    taken = _run(_train_args(data_dir, out, 1))
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"taking over the lock of {out} from PID {dead.pid}" in taken.stderr
    assert "Traceback" not in taken.stderr and not (out / ".lock").exists()
    assert (out / "model_final.pth").is_file()


def _check_storage_failure(proc: subprocess.CompletedProcess, out: Path, reason: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc)
    last_good = out / "checkpoints" / "checkpoint_0000001.pth"
    assert f"could not write {out / 'checkpoints' / 'checkpoint_0000002.pth'}: {reason}" in line, line
    assert f"the last good checkpoint is {last_good}" in line and "--resume auto" in line, line
    assert load_checkpoint(last_good)["iteration"] == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_0000001.pth"]  # no partial file
    assert not (out / ".lock").exists()
    assert line in (out / "log.txt").read_text()


@pytest.mark.parametrize("code,reason", [("ENOSPC", "the disk is full"), ("EROFS", "the filesystem is read-only")])
def test_full_or_read_only_disk_gives_one_line_naming_the_last_good_checkpoint(data_dir, tmp_path, code, reason):
    out = tmp_path / "run"
    proc = _run(_train_args(data_dir, out, 4, "--checkpoint-every", "1"),
                prefix=[sys.executable, str(HERE / "fake_full_disk.py"), code, "--"], cwd=HERE)
    _check_storage_failure(proc, out, reason)


def test_real_full_tmpfs(data_dir, tmp_path):
    """The same on a real, small tmpfs (needs the right to mount: root, as in some containers)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; test_full_or_read_only_disk... covers this with a fake disk")
    try:
        out = disk / "run"
        proc = _run(_train_args(data_dir, out, 6, "--checkpoint-every", "1", "--keep-checkpoints", "0"))
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert "the disk is full ([Errno 28] ENOSPC)" in line, line
        good = list_checkpoints(out)
        assert good and f"the last good checkpoint is {good[-1][1]}" in line
        load_checkpoint(good[-1][1])
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_unwritable_out_fails_before_the_work(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for args in (_train_args(data_dir, blocker / "run", 1),
                 ["eval", str(tmp_path / "w.pth"), "--data", str(data_dir), "--out", str(blocker / "ev")],
                 ["predict", "--preset", "tiny", "--random-init", str(data_dir / "images" / "val"),
                  "--out", str(blocker / "pred")]):
        (tmp_path / "w.pth").write_bytes(b"0")  # eval checks --out before reading the weights
        start = time.monotonic()
        proc = _run(args)
        assert proc.returncode == 2, (args[0], proc.stderr)
        line = _one_error_line(proc)
        assert f"--out {blocker}" in line and "is not writable" in line, line
        assert time.monotonic() - start < 60


def test_redirected_log_has_no_redraws_and_logs_lr_as_given(data_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    args = [a for a in _train_args(data_dir, out, 3, "--lr", "3e-4", "--backbone-lr", "2e-5")
            if a != "--no-tensorboard"]
    command = " ".join(f"'{a}'" for a in cli_command() + args)
    proc = subprocess.run(["sh", "-c", f"{command} > '{log}' 2>&1"], env=_env(), timeout=300)
    assert proc.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "\r" not in text and "iter 3/3" in text and "done: 3 iterations" in text
    assert (out / "log.txt").read_text() == text  # everything printed, nothing else
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iter"] for r in rows] == [1, 2, 3]
    assert all(r["lr"] == 3e-4 and r["lr_backbone"] == 2e-5 for r in rows), rows[0]
    note = "note: the tensorboard package is not installed"  # said once, when it is missing
    if importlib.util.find_spec("tensorboard") is None:
        assert text.count(note) == 1
    else:
        assert note not in text and (out / "tensorboard").is_dir()


def test_terminal_gets_a_bar_and_log_txt_does_not(data_dir, tmp_path):
    out = tmp_path / "run"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(cli_command() + _train_args(data_dir, out, 3, "--no-tensorboard"), env=_env(),
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    stdout, _ = proc.communicate(timeout=300)
    reader.join(10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal[-2000:]
    assert "\r" in terminal and "train:" in terminal  # tqdm's bar, redrawn in place
    assert "iter 1/3" not in stdout  # no summary lines when there is a bar
    log = (out / "log.txt").read_text()
    assert "\r" not in log and "done: 3 iterations" in log


def test_best_checkpoint_and_patience(data_dir, tmp_path):
    out = tmp_path / "run"
    # lr 0: every evaluation gives the same AP, so the first stays the best and patience 2 ends the run at
    # the third evaluation.
    args = _train_args(data_dir, out, 40)
    args[args.index("--val-split") + 1] = "val"
    proc = _run(args + ["--lr", "0", "--backbone-lr", "0", "--eval-every", "1", "--patience", "2",
                        "--max-eval-images", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "early stop: val AP has not improved for 2 evaluation(s) (--patience 2)" in proc.stdout
    assert "done: 3 iterations" in proc.stdout
    best = api.read_weights_file(out / "model_best.pth")
    assert best["extra"]["iteration"] == 1 and best["extra"]["split"] == "val"
    assert api.read_weights_file(out / "model_last.pth")["extra"]["iteration"] == 3
    assert (out / "model_final.pth").is_file()
    state = load_checkpoint(list_checkpoints(out)[-1][1])
    assert state["counters"]["best_iter"] == 1 and state["counters"]["evals_since_best"] == 2

    # eval of the best weights into a redirected log: no progress-bar redraws either
    evaluated = _run(["eval", str(out / "model_best.pth"), "--data", str(data_dir), "--out", str(tmp_path / "ev")])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "\r" not in evaluated.stderr + evaluated.stdout and "val: AP" in evaluated.stdout

    bad = _run(_train_args(data_dir, tmp_path / "x", 2, "--patience", "2"))
    assert bad.returncode == 2 and "--eval-every" in _one_error_line(bad)


def test_predict_interrupted_keeps_the_results_done(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(150):  # far more than can be done before the interrupt
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    out = tmp_path / "pred"
    proc = subprocess.Popen(cli_command() + ["predict", "--preset", "tiny", "--random-init", str(images),
                                             "--out", str(out)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "annotated").is_dir() and len(list((out / "annotated").iterdir())) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    done = json.loads((out / "images.json").read_text())
    count = len(done["images"])
    assert 2 <= count < 150 and done["info"]["interrupted"] is True
    assert last == f"interrupted after {count} of 150 image(s): results so far in {out / 'results.json'}"
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in done["images"]}
    assert len(list((out / "annotated").iterdir())) == count
    shutil.rmtree(images)


# ---- the pieces, without a training run -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \r\n", max_size=8), max_size=12))
def test_log_txt_keeps_what_a_terminal_would_finally_show(chunks):
    import tempfile

    from focus_detr.engine.logging import _LogFile

    with tempfile.TemporaryDirectory() as folder:
        log = _LogFile(Path(folder) / "log.txt")
        for chunk in chunks:  # written in arbitrary pieces, as prints and tqdm do
            log.feed("stderr", chunk)
        log.close()
        text = (Path(folder) / "log.txt").read_text()
    *complete, tail = "".join(chunks).split("\n")
    expected = "".join(line.rsplit("\r", 1)[-1] + "\n" for line in complete)
    last = tail.rsplit("\r", 1)[-1]
    expected += last + "\n" if last.strip() else ""
    assert text == expected and "\r" not in text


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    """A lock naming a PID that now belongs to another process (started later) is taken over."""
    lock = RunLock(tmp_path)
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                "started": "long ago", "start_ticks": 1}))
    with pytest.warns(UserWarning, match="which no longer runs"):
        lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_storage_error_text_finds_the_os_error_inside_torch_errors(tmp_path):
    import errno

    from focus_detr.engine.run_dir import storage_error_text

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed") from inner
    except RuntimeError as outer:
        text = storage_error_text(outer, tmp_path / "c.pth", tmp_path / "b.pth")
    assert text == (f"could not write {tmp_path / 'c.pth'}: the disk is full ([Errno 28] ENOSPC); the last good "
                    f"checkpoint is {tmp_path / 'b.pth'}. Free space or fix the folder, then continue with "
                    "--resume auto")
    assert "no checkpoint was written yet" in storage_error_text(OSError(errno.EROFS, "ro"), tmp_path / "c", None)
