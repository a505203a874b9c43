"""Tests of focus_detr.bench and `focus-detr benchmark` (tiny preset, small inputs, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
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

ROOT = Path(__file__).resolve().parents[1]


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
    proc = subprocess.run(cli_command() + ["benchmark", "--preset", "tiny", "--size", "128x160", "--repeats", "1",
                                               "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    (entry,) = report["results"]
    assert entry["size"] == [128, 160]
    assert set(entry["modes"]) == set(MODES)
    for mode in MODES:
        assert entry["memory"][mode]["peak_mb"] > 0, entry["memory"][mode]
    assert entry["modes"]["focus"]["stages"]["encoder"]["gflops"] < entry["modes"]["dense"]["stages"]["encoder"]["gflops"]
