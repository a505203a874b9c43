"""`focus-detr compare-modes`: the keep-ratio solver, and a tiny end-to-end run through the console script."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_utils import cli_command
from focus_detr.engine.compare import EncoderSetting, solve_keep_ratio


@settings(max_examples=60, deadline=None)
@given(base=st.floats(0.0, 5.0), slope=st.floats(0.5, 50.0), steps=st.integers(40, 5000),
       fraction=st.floats(0.1, 0.95))
def test_solver_finds_the_matching_ratio_of_a_step_cost(base: float, slope: float, steps: int, fraction: float) -> None:
    # Like an encoder's FLOPs: a fixed part plus a part proportional to int(ratio * tokens).
    def cost(r: float) -> float:
        return base + slope * math.floor(r * steps) / steps

    target = base + slope * fraction
    calls: list[float] = []
    # A coarse step function may have no step within 5 % of the target (e.g. 40 tokens, no base cost):
    # then the solver must say so rather than return a ratio outside the tolerance.
    reachable = any(abs((base + slope * k / steps) / target - 1.0) <= 0.05
                    for k in range(math.floor(0.01 * steps), steps + 1))
    if not reachable:
        with pytest.raises(ValueError, match="within 5%"):
            solve_keep_ratio(cost, target, tolerance=0.05)
        return
    solution = solve_keep_ratio(lambda r: calls.append(r) or cost(r), target, tolerance=0.05)
    assert abs(solution.cost / target - 1.0) <= 0.05
    assert solution.cost == cost(solution.keep_ratio) and 0.01 <= solution.keep_ratio <= 1.0
    assert solution.keep_ratio == round(solution.keep_ratio, 3)
    assert len(calls) == len(set(calls)) == len(solution.trace) <= 40  # no point counted twice
    # The answer is the best of what was evaluated, and close to the exact inverse where the steps are fine.
    assert abs(solution.cost / target - 1) == min(abs(c / target - 1) for _, c in solution.trace)
    if steps >= 1000:
        assert abs(solution.keep_ratio - fraction) < 0.02


def test_solver_rejects_an_unreachable_target() -> None:
    with pytest.raises(ValueError, match="within 5%"):
        solve_keep_ratio(lambda r: 10.0 * r, 20.0)  # more than the cost of keeping every token
    with pytest.raises(ValueError, match="within 5%"):
        solve_keep_ratio(lambda r: 5.0 + r, 1.0)  # less than the cost of keeping almost nothing


def test_setting_names() -> None:
    assert EncoderSetting("dense", 1.0, "dense").name == "dense"
    assert EncoderSetting("sparse", 0.415, "matched").name == "sparse-0.415"
    assert EncoderSetting("focus", 0.5, "matched").overrides() == {"encoder.mode": "focus", "encoder.keep_ratio": 0.5}
    assert EncoderSetting("dense", 1.0, "dense").overrides() == {"encoder.mode": "dense"}


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*cli_command(), *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def test_compare_modes_end_to_end(tmp_path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _cli("make-data", "crowded-shapes", "--out", str(data), "--train", "4", "--val", "2", "--image-size", "128,160",
         "--objects", "5", "--min-object-size", "8")
    args = ("compare-modes", "--data", str(data), "--out", str(out), "--iters", "2", "--seeds", "1",
            "--batch-size", "2", "--speed-keep-ratios", "0.3", "--latency-repeats", "1", "--quiet")
    first = _cli(*args).stdout
    assert "4 runs (4 configurations x 1 seeds" in first and "0 finished earlier" in first

    comparison = json.loads((out / "comparison.json").read_text())
    runs = comparison["runs"]
    assert sorted((r["config"].split("-")[0], r["seed"]) for r in runs) == sorted(
        (mode, 0) for mode in ("dense", "sparse", "focus", "focus"))
    for r in runs:
        for key in ("keep_ratio", "encoder_gflops", "total_gflops", "latency_ms", "AP", "AP50", "APs", "APm",
                    "APl"):
            assert key in r, key
        assert r["encoder_gflops"] > 0 and r["total_gflops"] > r["encoder_gflops"] and r["latency_ms"] > 0
        assert r["iterations"] == 2 and (r["AP"] is None or 0.0 <= r["AP"] <= 1.0)

    def one(config_prefix: str, seed: int = 0) -> dict:
        return next(r for r in runs if r["config"].startswith(config_prefix) and r["seed"] == seed)

    dense, sparse, focus, fast = one("dense"), one("sparse"), one("focus-0.5"), one("focus-0.3")
    # The matched-cost rule: sparse's encoder GFLOPs within 5 % of focus's at the paper's keep ratio.
    assert abs(sparse["encoder_gflops"] / focus["encoder_gflops"] - 1.0) <= 0.05
    assert comparison["matched_cost"]["sparse_keep_ratio"] == sparse["keep_ratio"] < 1.0
    assert dense["keep_ratio"] == 1.0 and focus["keep_ratio"] == 0.5
    assert fast["encoder_gflops"] < focus["encoder_gflops"] < dense["encoder_gflops"]
    assert dense["latency_vs_dense"] == 1.0
    # Same initialisation per seed: every mode loaded all its tensors from the shared file.
    assert (out / "init" / "seed_0.pth").is_file() and (out / "runs" / "dense_seed0" / "run_spec.json").is_file()
    assert comparison["focus_minus_sparse"]["AP"]["n"] in (0, 1)
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| dense | 1 |")
    png = (out / "ap_vs_encoder_gflops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # Resumable: a second call trains nothing and reuses the latency pass.
    again = _cli(*args).stdout
    assert "4 finished earlier, 0 to train" in again and "latency: reusing" in again


def test_compare_modes_errors(tmp_path) -> None:
    missing = _cli("compare-modes", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "nope" in missing.stderr and "make-data" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "half" / "annotations").mkdir(parents=True)
    (tmp_path / "half" / "annotations" / "instances_train.json").write_text("{}")
    half = _cli("compare-modes", "--data", str(tmp_path / "half"), "--out", str(tmp_path / "o"), check=False)
    assert half.returncode != 0 and "instances_train.json: not a COCO annotation file" in half.stderr
    bad = _cli("compare-modes", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set",
               "encoder.mode=dense", check=False)
    assert bad.returncode == 2 and "chooses the encoder mode" in bad.stderr


def test_help_has_an_example(capsys) -> None:
    from focus_detr.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["compare-modes", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: focus-detr compare-modes" in text and "focus-detr compare-modes --data" in text
    assert "--remeasure-latency" in text and "--speed-keep-ratios" in text


def test_a_failed_run_is_named_and_does_not_stop_the_others(monkeypatch, tmp_path) -> None:
    from focus_detr.engine import compare

    recipe = compare.CompareRecipe(iterations=1, seeds=(0,))
    specs = [compare.RunSpec(compare.EncoderSetting(mode, 1.0 if mode == "dense" else 0.5, "matched"), 0,
                             str(tmp_path / mode), "init.pth", str(tmp_path), recipe, (64, 64), False)
             for mode in ("dense", "focus")]

    def fake(spec):
        if spec.setting.mode == "dense":
            raise RuntimeError("diverged\nsecond line")
        return {"AP": 0.1, "AP50": 0.2, "seconds": 1.0}

    monkeypatch.setattr(compare, "train_and_evaluate", fake)
    results: dict = {}
    lines: list[str] = []
    with pytest.raises(compare.CompareError, match=r"1 of 2 runs failed .*dense_seed0: RuntimeError: diverged$"):
        compare._train_all(specs, 1, results, 2, lines.append)
    assert list(results) == ["focus-0.5_seed0"]  # the other run went on
    assert any(line.startswith("  FAILED dense_seed0") for line in lines)
