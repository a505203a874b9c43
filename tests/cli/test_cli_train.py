"""End to end through the installed console script: make-data -> train -> eval, plus --help and errors."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cli_utils import cli_command


def run_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"focus-detr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("command,expected", [
    ("make-data", "--train"), ("train", "--resume"), ("eval", "--split"), ("demo", "--out"),
])
def test_help(command, expected):
    out = run_cli(command, "--help").stdout
    assert expected in out and "usage:" in out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def test_make_data_train_eval_end_to_end(workspace):
    data, run = workspace / "data", workspace / "run"
    out = run_cli("make-data", "shapes", "--out", str(data), "--train", "6", "--val", "2", "--seed", "1",
                  "--image-size", "96,128", "--min-object-size", "8", "--objects", "3").stdout
    assert "train: 6 images" in out
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json",
                "images/train/000006.jpg", "images/val/000002.jpg"):
        assert (data / rel).is_file(), rel
    again = run_cli("make-data", "shapes", "--out", str(data), "--train", "6", "--val", "2", "--seed", "1",
                    "--image-size", "96,128", "--min-object-size", "8", "--objects", "3").stdout
    assert "already present" in again

    out = run_cli("train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--schedule", "none",
                  "--max-iters", "3", "--batch-size", "2", "--workers", "0", "--train-scales", "96",
                  "--lr", "2e-4", "--backbone-lr", "2e-4", "--checkpoint-every", "2", "--log-every", "1",
                  "--set", "decoder.num_queries=20", "--set", "encoder.oesm_topk=20", "--set", "test_short_side=96",
                  "--no-progress", "--no-tensorboard", "--seed", "3").stdout
    assert "done: 3 iterations" in out and "AP50" in out
    for rel in ("model_final.pth", "config.json", "environment.json", "metrics.jsonl",
                "checkpoints/checkpoint_0000002.pth", "checkpoints/checkpoint_0000003.pth",
                "eval/iter_0000003/metrics.json", "eval/iter_0000003/predictions.json"):
        assert (run / rel).is_file(), rel
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["model"]["decoder"]["num_queries"] == 20
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["type"] == "train"] == [1, 2, 3]

    # eval of the final weights (model rebuilt from the file alone) ...
    out = run_cli("eval", str(run / "model_final.pth"), "--data", str(data), "--out", str(workspace / "ev"),
                  "--no-progress").stdout
    assert "val: AP" in out
    metrics = json.loads((workspace / "ev" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(metrics)
    assert 0.0 <= metrics["AP"] <= 1.0
    preds = json.loads((workspace / "ev" / "predictions.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= set(range(1, 7))  # the file's category ids
    # ... gives the same numbers as the evaluation at the end of training,
    final = json.loads((run / "eval" / "iter_0000003" / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(final["AP"]) and metrics["AP50"] == pytest.approx(final["AP50"])
    # ... and so does a training checkpoint (default output folder next to the file).
    run_cli("eval", str(run / "checkpoints" / "checkpoint_0000003.pth"), "--data", str(data), "--no-progress")
    ckpt_metrics = json.loads((run / "checkpoints" / "eval_val" / "metrics.json").read_text())
    assert ckpt_metrics["AP"] == pytest.approx(final["AP"])

    # Resuming a finished run with --resume auto trains nothing more and succeeds.
    out = run_cli("train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--schedule", "none",
                  "--max-iters", "3", "--batch-size", "2", "--workers", "0", "--train-scales", "96",
                  "--lr", "2e-4", "--backbone-lr", "2e-4", "--set", "decoder.num_queries=20",
                  "--set", "encoder.oesm_topk=20", "--set", "test_short_side=96", "--no-progress",
                  "--no-tensorboard", "--seed", "3", "--resume", "auto").stdout
    assert "resuming at iteration 3" in out


def test_clear_errors_without_tracebacks(workspace, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    proc = run_cli("eval", str(bad), "--data", str(tmp_path), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "truncated or not a PyTorch file" in proc.stderr

    proc = run_cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--max-iters", "1",
                   check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "dataset folder not found" in proc.stderr

    data = workspace / "data"
    if data.exists():  # written by the end-to-end test
        proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "r2"), "--max-iters", "1",
                       "--resume", str(bad), check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "truncated" in proc.stderr
        proc = run_cli("eval", str(bad), "--data", str(data), "--split", "test", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_demo_time_budget_helpers(tmp_path):
    from focus_detr.cli.options import choose_threads
    from focus_detr.engine.demo import planned_iterations, seconds_per_iteration

    rows = [{"type": "event", "iter": 0, "time": 0.0}, {"type": "train", "iter": 25, "time": 100.0},
            {"type": "train", "iter": 50, "time": 105.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert seconds_per_iteration(tmp_path / "metrics.jsonl") == pytest.approx(0.2)
    assert planned_iterations(tmp_path) is None
    (tmp_path / "demo_plan.json").write_text(json.dumps({"iterations": 4200}))
    assert planned_iterations(tmp_path) == 4200
    assert choose_threads("3") == 3 and choose_threads("auto") >= 1


def test_demo_plan_fits_the_budget_or_reports_the_overrun():
    from focus_detr.engine.demo import RECIPE, plan_iterations

    # The development machine: 0.161 s per iteration, 25 s spent -> 5200 iterations, about 14.7 min expected.
    iterations, expected = plan_iterations(RECIPE, 0.161, 25.0, 17.0)
    assert iterations == 5200 and 13.0 < expected < 17.0
    # Always a multiple of 100 within [iterations, max_iterations], and within budget whenever that is possible.
    for per_iter in (0.01, 0.05, 0.1, 0.2, 0.25, 0.3):
        iterations, expected = plan_iterations(RECIPE, per_iter, 25.0, 17.0)
        assert RECIPE.iterations <= iterations <= RECIPE.max_iterations and iterations % 100 == 0
        assert expected <= 17.0 or iterations == RECIPE.iterations
    assert plan_iterations(RECIPE, 0.01, 25.0, 17.0)[0] == RECIPE.max_iterations
    # A machine too slow for the minimum: the plan keeps the minimum and its expected time shows the overrun.
    iterations, expected = plan_iterations(RECIPE, 0.5, 25.0, 17.0)
    assert iterations == RECIPE.iterations and expected > 17.0


def test_demo_end_to_end_small(tmp_path):
    """The README's main job on a CI-sized budget: dataset, training, held-out evaluation, report files."""
    run = tmp_path / "demo"
    out = run_cli("demo", "--out", str(run), "--iters", "6", "--train-images", "8", "--val-images", "3",
                  "--pictures", "2", "--no-progress").stdout
    assert "[4/4]" in out and "held-out AP" in out
    report = json.loads((run / "metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert report[key] is None or 0.0 <= report[key] <= 1.0, key
    assert report["iterations"] == 6 and report["num_val_images"] == 3
    assert report["recipe"]["model_overrides"] == {"decoder.query_nms_iou": 0.5}
    assert (run / "loss_curve.png").stat().st_size > 0
    assert len(list((run / "predictions").glob("*.png"))) == 2
    import focus_detr

    model = focus_detr.load(run / "model_final.pth")
    assert model.cfg.decoder.query_nms_iou == 0.5 and model.cfg.num_classes == 6
    # Running it again on the same folder resumes the finished run instead of training anew.
    again = run_cli("demo", "--out", str(run), "--iters", "6", "--train-images", "8", "--val-images", "3",
                    "--pictures", "0", "--no-progress").stdout
    assert "already present" in again


def test_demo_set_changes_the_model_and_rejects_unknown_options(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "bad"), "--iters", "1", "--train-images", "2", "--val-images", "1",
                   "--no-progress", "--set", "decoder.bogus=1", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "decoder.bogus" in proc.stderr
    run = tmp_path / "ok"
    run_cli("demo", "--out", str(run), "--iters", "1", "--train-images", "2", "--val-images", "1", "--pictures", "0",
            "--no-progress", "--set", "decoder.query_nms_iou=None", "--set", "encoder.oesm_score=prob_product")
    report = json.loads((run / "metrics.json").read_text())
    assert report["recipe"]["model_overrides"] == {"decoder.query_nms_iou": None, "encoder.oesm_score": "prob_product"}
    import focus_detr

    cfg = focus_detr.load(run / "model_final.pth").cfg
    assert cfg.decoder.query_nms_iou is None and cfg.encoder.oesm_score == "prob_product"
