"""Tests of focus_detr.bench and `focus-detr benchmark` (tiny preset, small inputs, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from focus_detr.bench import (MODES, STAGES, SamplingCounter, benchmark_train_step, build_mode_models,
                              deformable_sampling_flops, flop_counter, format_report, parse_size, run_benchmark)
from focus_detr.cli.main import main as cli_main
from focus_detr.layers.deformable_attention import MultiScaleDeformableAttention
from cli_utils import cli_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_report():
    return run_benchmark("tiny", sizes=[(96, 128)], repeats=1, warmup=0, memory=False, anchor=False)


# ---- FLOP formulas ------------------------------------------------------------------------------------------
def test_sampling_flops_hand_computed():
    # B=1, Q=2, heads=2, levels=1, points=3, head_dim=4: per sampled value 4 bilinear MACs + 1 weighted-sum MAC
    # = 5 MAC = 10 FLOP; 1*2*2*1*3*4 = 48 sampled values -> 480 FLOP.
    assert deformable_sampling_flops(1, 2, 2, 1, 3, 4) == 480
    # the official R50 focus model at 800x1333 samples 185,962,496 values (manifest) -> 1.86 GFLOP
    assert deformable_sampling_flops(1, 185_962_496, 1, 1, 1, 1) == 1_859_624_960


def test_sampling_counter_hooks_the_module():
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=3).eval()
    shapes = torch.tensor([[4, 4], [2, 2]])
    value = torch.randn(1, 20, 16)
    query = torch.randn(1, 5, 16)
    ref = torch.rand(1, 5, 2, 2)
    with SamplingCounter(attn) as counter, torch.no_grad():
        attn(query, ref, value, shapes)
    assert counter.calls == 1
    assert counter.elements == 1 * 5 * 2 * 2 * 3 * 8
    assert counter.flops == deformable_sampling_flops(1, 5, 2, 2, 3, 8)
    # hooks are removed on exit
    with torch.no_grad():
        attn(query, ref, value, shapes)
    assert counter.calls == 1


def test_flop_counter_does_not_see_grid_sample():
    """The sampling count is added on top of FlopCounterMode, so the counter must not count grid_sample."""
    x, grid = torch.randn(2, 8, 10, 10), torch.rand(2, 5, 4, 2) * 2 - 1
    with FlopCounterMode(display=False) as fc:
        F.grid_sample(x, grid, align_corners=False)
    assert fc.get_total_flops() == 0


def test_attention_kernels_counted_like_their_decomposition():
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q = torch.randn(2, 10, 32)
    # q, k, v, out projections 4 * 2*B*L*E*E + Q K^T and A V 2 * 2*B*L*L*E
    expected = 4 * 2 * 2 * 10 * 32 * 32 + 2 * 2 * 2 * 10 * 10 * 32
    with flop_counter() as fc, torch.no_grad():  # inference: fused fast path
        mha(q, q, q, need_weights=False)
    assert fc.get_total_flops() == expected
    with flop_counter() as fc:  # with autograd: decomposed (addmm + CPU SDPA kernel)
        mha(q, q, q, need_weights=False)
    assert fc.get_total_flops() == expected


# ---- models -------------------------------------------------------------------------------------------------
def test_modes_share_weights():
    models, not_shared = build_mode_models("tiny", MODES, seed=3)
    focus = dict(models["focus"].named_parameters())
    for mode in ("dense", "sparse"):
        params = dict(models[mode].named_parameters())
        assert set(params) < set(focus)
        for name, p in params.items():
            assert torch.equal(p, focus[name]), name
    assert "foreground_selector" in not_shared["dense"]
    assert "foreground_selector" not in not_shared["sparse"]
    assert not_shared["focus"] == []


def test_parse_size():
    assert parse_size("800x1333") == (800, 1333)
    assert parse_size(" 96X128 ") == (96, 128)
    for bad in ("800", "axb", "8x8", "800x1333x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ---- report -------------------------------------------------------------------------------------------------
def test_report_structure(tiny_report):
    r = tiny_report
    assert r["modes"] == list(MODES)
    assert r["stages"] == list(STAGES) + ["total"]
    json.dumps(r)  # serialisable
    (entry,) = r["results"]
    assert entry["size"] == [96, 128]
    for mode in MODES:
        stages = entry["modes"][mode]["stages"]
        assert set(stages) == set(STAGES) | {"total"}
        for s in stages.values():
            assert s["ms"] >= 0 and s["gflops"] >= 0 and len(s["ms_all"]) == 1
        assert stages["total"]["gflops"] == pytest.approx(sum(stages[s]["gflops"] for s in STAGES))
        assert stages["encoder"]["gflops_sampling"] > 0 and stages["decoder"]["gflops_sampling"] > 0
        assert r["params"][mode]["total"] > 0
    enc = {m: entry["modes"][m]["stages"]["encoder"]["gflops"] for m in MODES}
    assert enc["focus"] < enc["dense"]
    assert enc["sparse"] < enc["dense"]
    # backbone and decoder do the same work in every mode
    for stage in ("backbone", "decoder"):
        ref = entry["modes"]["dense"]["stages"][stage]["gflops"]
        assert entry["modes"]["focus"]["stages"][stage]["gflops"] == pytest.approx(ref)
    # no token selection in dense mode: no FLOPs there, and no latency ratio
    assert entry["modes"]["dense"]["stages"]["token_selection"]["gflops"] == 0
    assert entry["ratios"]["focus/dense"]["token_selection"]["ms"] is None
    assert entry["ratios"]["focus/dense"]["encoder"]["gflops"] == pytest.approx(enc["focus"] / enc["dense"])
    for key in ("ms", "ms_paired", "ms_min"):
        assert entry["ratios"]["focus/dense"]["total"][key] > 0
    assert entry["backbone_calls_per_forward"]["focus"] >= 1
    assert set(entry["ratios"]) == {"focus/dense", "sparse/dense"}
    tokens = entry["tokens"]
    n = tokens["dense"]["num_tokens"]
    assert tokens["dense"]["per_layer"] == [n, n]
    assert tokens["focus"]["per_layer"][1] < tokens["focus"]["per_layer"][0] < n  # cascade
    assert entry["memory"] == {"skipped": "disabled (--no-memory)"}
    assert "skipped" in r["anchor"]
    text = format_report(r)
    assert "focus/dense" in text and "encoder" in text


def test_plot(tiny_report, tmp_path):
    pytest.importorskip("matplotlib")
    from focus_detr.bench import plot_report

    (path,) = plot_report(tiny_report, tmp_path / "bars.png")
    assert Path(path).stat().st_size > 1000


def test_refresh_derived_recomputes(tiny_report):
    import copy

    from focus_detr.bench import refresh_derived

    r = copy.deepcopy(tiny_report)
    r["results"][0]["ratios"] = {}
    r["targets"] = None
    refresh_derived(r)
    assert r["results"][0]["ratios"] == tiny_report["results"][0]["ratios"]


def test_backbone_once_wrapper():
    from focus_detr.bench.models import BackboneOnce, backbone_module, make_batch

    models, _ = build_mode_models("tiny", ("focus",), seed=0, backbone_once=True)
    model = models["focus"]
    assert isinstance(model.backbone, BackboneOnce)
    calls = []
    backbone_module(model).register_forward_hook(lambda *_: calls.append(1))
    batch = make_batch(model, (96, 128))
    with torch.no_grad():
        out1 = model(batch)
    assert len(calls) == 1 and model.backbone._cache is None  # computed once, cache cleared after the forward
    plain, _ = build_mode_models("tiny", ("focus",), seed=0)
    with torch.no_grad():
        out2 = plain["focus"](batch)
    assert torch.allclose(out1.main.logits, out2.main.logits, atol=1e-5)


def test_train_step_speed():
    result = benchmark_train_step("tiny", ("focus", "dense"), batch=1, size=(96, 128), steps=1, warmup=0)
    for mode in ("focus", "dense"):
        assert result["modes"][mode]["images_per_s"] > 0
    assert result["ratios"]["focus/dense"] > 0


# ---- CLI ----------------------------------------------------------------------------------------------------
def test_cli_help():
    proc = subprocess.run(cli_command() + ["benchmark", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--json", "--preset", "--size", "--repeats", "--modes", "--threads", "--device"):
        assert flag in proc.stdout


def test_cli_rejects_bad_arguments(capsys):
    assert cli_main(["benchmark", "--preset", "tiny", "--modes", "focus,fast"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert cli_main(["benchmark", "--preset", "tiny", "--size", "128"]) == 2
    assert cli_main(["benchmark", "--preset", "nope"]) == 2


@pytest.mark.slow
def test_cli_json_tiny():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "FOCUS_DETR_ALLOCATOR"}
    proc = subprocess.run(cli_command() + ["benchmark", "--preset", "tiny", "--size", "128x160", "--repeats", "1",
                                               "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    if sys.platform.startswith("linux"):  # the command keeps freed memory for reuse (focus_detr.allocator)
        assert report["meta"]["allocator"] == "glibc: large blocks from the heap, freed memory kept"
    (entry,) = report["results"]
    assert entry["size"] == [128, 160]
    assert set(entry["modes"]) == set(MODES)
    for mode in MODES:
        assert entry["memory"][mode]["peak_mb"] > 0, entry["memory"][mode]
    assert entry["modes"]["focus"]["stages"]["encoder"]["gflops"] < entry["modes"]["dense"]["stages"]["encoder"]["gflops"]


# ---- efficiency against the machine's matmul peak ------------------------------------------------------------
def test_matmul_peak_and_efficiency():
    from focus_detr.bench.peak import efficiency, find_peak, matmul_peak, measure_peaks

    p = matmul_peak("fp32", threads=1, size=128, trials=2, trial_seconds=0.01)
    assert p["dtype"] == "fp32" and p["threads"] == 1 and p["n"] == 128
    assert p["gflops"] == max(p["trials_gflops"]) > 0
    peaks = measure_peaks(("fp32",), (1, 1), size=64, trials=1, trial_seconds=0.001)
    assert len(peaks) == 1  # thread counts deduplicated
    assert find_peak(peaks, "fp32", 1) is peaks[0] and find_peak(peaks, "bf16", 1) is None
    # 10 GFLOP in 500 ms = 20 GFLOP/s, a quarter of an 80 GFLOP/s peak
    assert efficiency(10.0, 500.0, 80.0) == {"gflops_per_s": 20.0, "of_peak": 0.25}
    assert efficiency(0.0, 5.0, 80.0) == {"gflops_per_s": None, "of_peak": None}
    with pytest.raises(ValueError, match="dtype"):
        matmul_peak("int8")


def test_report_has_efficiency_columns(tiny_report):
    peak = tiny_report["efficiency_peak"]
    assert peak["dtype"] == "fp32" and peak["gflops"] > 0
    assert {(p["dtype"], p["threads"]) for p in tiny_report["peaks"]} >= {("fp32", 1), ("bf16", 1)}
    total = tiny_report["results"][0]["modes"]["focus"]["stages"]["total"]
    assert total["gflops_per_s"] == pytest.approx(total["gflops"] / (total["ms"] / 1000))
    assert total["of_peak"] == pytest.approx(total["gflops_per_s"] / peak["gflops"])
    text = format_report(tiny_report)
    assert "matmul peak" in text and "GFLOP/s (of peak)" in text
    assert any(t["name"].startswith("focus whole model, fraction of the fp32 matmul peak")
               for t in tiny_report["targets"]) or tiny_report["results"][0]["size"] != [800, 1333]


# ---- contention ---------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] not in ("Z", "X")
    except OSError:
        return False


def test_background_load_starts_and_stops_its_processes():
    from focus_detr.bench.contention import BackgroundLoad, load_cores

    assert load_cores(2, pinned=False) == [None, None]
    n = os.cpu_count() or 1
    assert load_cores(1, pinned=True) == [n - 1]
    with BackgroundLoad(1, pinned=True) as bg:
        (proc,) = bg._procs
        assert _alive(proc.pid)
        if hasattr(os, "sched_getaffinity"):
            assert os.sched_getaffinity(proc.pid) == {n - 1}
        assert "pinned to core" in bg.describe()
    assert proc.poll() is not None  # stopped on exit
    assert BackgroundLoad(0).describe().startswith("quiet")
    with pytest.raises(ValueError):
        BackgroundLoad(-1)


def test_contention_blocks_tiny():
    from focus_detr.bench.contention import format_contention, run_contention

    result = run_contention("tiny", (64, 96), load=1, threads=(1,), repeats=1, warmup=0)
    quiet, loaded = result["blocks"]
    assert (quiet["load_processes"], loaded["load_processes"]) == (0, 1)
    for block in (quiet, loaded):
        assert block["threads"] == 1
        ratio = block["ratios"]["focus/dense"]["total"]
        assert ratio["ms"] == pytest.approx(block["stages_ms"]["focus"]["total"] / block["stages_ms"]["dense"]["total"])
    assert "focus/dense" in "\n".join(format_contention(result))


def test_cli_contention_arguments(capsys):
    assert cli_main(["benchmark", "--preset", "tiny", "--background-load", "-1"]) == 2
    assert "--background-load" in capsys.readouterr().err
    assert cli_main(["benchmark", "--preset", "tiny", "--modes", "focus,sparse", "--background-load", "1"]) == 2
    assert "focus with dense" in capsys.readouterr().err


# ---- training cost --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_step_three_modes_with_memory():
    from focus_detr.bench import format_train_step

    result = benchmark_train_step("tiny", ("focus", "dense", "sparse"), batch=1, size=(64, 96), steps=1, warmup=0,
                                  threads=1, memory=True)
    assert set(result["ratios"]) >= {"focus/dense", "sparse/dense"}
    for mode in ("focus", "dense", "sparse"):
        mem = result["modes"][mode]["memory"]
        assert "error" not in mem, mem
        assert mem["peak_mb"] > 0 and mem["step_ms"] > 0
        if mem.get("increase_mb") is not None:
            assert 0 <= mem["increase_mb"] <= mem["peak_mb"]
    text = "\n".join(format_train_step(result, markdown=True))
    assert "peak MiB" in text and "sparse" in text


# ---- benchmarks/gpu.sh ----------------------------------------------------------------------------------------
def _script_env() -> dict[str, str]:
    import sys

    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_gpu_script_refuses_without_gpu(tmp_path):
    if torch.cuda.is_available():  # the refusal is for machines without a GPU; this one has one
        return
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=120, env=_script_env())
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "gpu").exists()  # failed before any work


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=_script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "gpu.md").read_text()
    assert "DRY RUN" in text and "| focus |" in text and "| sparse |" in text and "Training step" in text
    report = json.loads((out / "gpu.json").read_text())
    assert report["errors"] == [], report["errors"]
    for precision in report["inference"]:
        assert set(report["inference"][precision]) == set(MODES)
    assert set(report["training"]["fp32"]) == set(MODES)
    assert json.loads((out / "stages.json").read_text())["results"]


def test_gpu_compile_failure_is_reported_not_fatal():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    result = bench_gpu.try_compile("tiny", (64, 64), "cpu", "no_such_backend", timeout=300)
    assert "error" in result and "\n" not in result["error"]
    assert "no_such_backend" in result["error"] or "backend" in result["error"].lower()


def test_background_load_dies_with_the_benchmark():
    """A benchmark killed before it could stop its load leaves no process spinning behind."""
    import signal
    import sys
    import time

    code = ("from focus_detr.bench.contention import BackgroundLoad\nimport time\n"
            "bg = BackgroundLoad(1).__enter__()\nprint(bg._procs[0].pid, flush=True)\ntime.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    busy = int(parent.stdout.readline())
    assert _alive(busy)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 60
    while _alive(busy) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = not _alive(busy)
    if not gone:
        os.kill(busy, signal.SIGKILL)
    assert gone
