"""Inference precision (focus_detr.optimize_for_inference) and the mixed-precision policy under autocast.

Bounds for bf16 against fp32 (stated once, used below). bfloat16 keeps 8 significant bits: each rounding
changes a value by up to 2^-9 ~ 0.2 % of itself. The transformer runs ~20 rounded matrix products and norms
between the image and a class logit; the errors add up roughly like a random walk, so a logit of size ~5 moves
by ~5 * 0.002 * sqrt(20) ~ 0.05. With the decisions forced to fp32's (every top-k replays the fp32 indices, so
the same tokens and queries are compared), we require:

* class logits within 0.25 absolute (5x that estimate), so detection scores (sigmoid, slope <= 1/4)
  within 0.0625;
* boxes (sigmoid cxcywh, normalised) within 0.03 of the image size: the box heads run in float32, only their
  inputs carry bf16 error, but each of the 6 decoder layers refines the box of the previous one;
* foreground token scores within 0.1 (they feed top-k; the score head is float32).

Observed (2-core AMD EPYC, torch 2.13): tiny model max |logit| diff 0.017, scores 0.0004; parity weights (R50,
96x128 and 128x160 inputs) top-100 scores 0.009 / 0.005, top-100 boxes 0.011 / 0.012, foreground 0.005, all
logits 0.12 / 0.20. The top-100 score bound has a 7x margin, the box bound ~2.5x.

Without forcing, near-tied tokens may swap; the free-running bf16 model must still pick >= 90 % of fp32's
queries. fp32 with FrozenBN folded differs from the original only by float32 rounding (1e-4 on logits).
"""

from __future__ import annotations

import copy
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import focus_detr
from cli_utils import cli_command
from focus_detr.backbones.resnet import Conv2dNorm, ResNet
from focus_detr.config import make_config
from focus_detr.layers.frozen_bn import FrozenBatchNorm2d, fold_frozen_batch_norm
from focus_detr.model.optimize import (FLOAT32_MODULES, PRECISIONS, InferenceFocusDETR, InferenceOnlyError,
                                       PrecisionError, fold_frozen_batch_norms, keep_heads_in_float32,
                                       optimize_for_inference)
from focus_detr.model.selection import SelectionPolicy
from focus_detr.ops import ms_deform_attn as msda

LOGIT_BOUND = 0.25
SCORE_BOUND = LOGIT_BOUND / 4
BOX_BOUND = 0.03
FOREGROUND_BOUND = 0.1
MIN_FREE_QUERY_OVERLAP = 0.9


class ReplayPolicy(SelectionPolicy):
    """Records every top-k decision of one run; with ``replay()`` the next run takes the same indices."""

    def __init__(self) -> None:
        self.log: list[torch.Tensor] = []
        self.queue: list[torch.Tensor] | None = None

    def replay(self) -> ReplayPolicy:
        self.queue = list(self.log)
        return self

    def _take(self, choose, *args):
        if self.queue is not None:
            return self.queue.pop(0)
        chosen = choose(*args)
        self.log.append(chosen)
        return chosen

    def foreground(self, scores, k, layer):
        assert scores.dtype == torch.float32, "foreground top-k must rank float32 scores"
        return self._take(super().foreground, scores, k, layer)

    def oesm(self, scores, k, layer):
        assert scores.dtype == torch.float32, "OESM top-k must rank float32 scores"
        return self._take(super().oesm, scores, k, layer)

    def proposals(self, scores, k):
        assert scores.dtype == torch.float32, "query selection must rank float32 scores"
        return self._take(super().proposals, scores, k)


def _randomise_frozen_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Statistics far from the identity, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _tiny(norm: str = "frozen_bn", seed: int = 0) -> focus_detr.FocusDETR:
    torch.manual_seed(seed)
    model = focus_detr.build_model(make_config("tiny", **{"backbone.norm": norm})).eval()
    _randomise_frozen_bn(model, seed)
    return model


def _image(seed: int = 0, size: tuple[int, int] = (160, 192)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth blobs rather than noise: features with structure, like a photo, so scores are not all tied.
    low = torch.rand(1, 3, size[0] // 16, size[1] // 16, generator=g)
    return (F.interpolate(low, size=size, mode="bilinear", align_corners=False)[0] * 255).round()


def _bf16(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 without bf16 units: tested below
        return optimize_for_inference(model, "bf16")


# ---- FrozenBN folding --------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), channels=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_fold_frozen_bn_is_exact_in_float64(kernel: int, stride: int, channels: int, seed: int) -> None:
    torch.manual_seed(seed)
    conv = Conv2dNorm(3, channels, kernel, stride, kernel // 2, "frozen_bn").double()
    _randomise_frozen_bn(conv, seed)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    expected = conv(x)
    assert conv.fold_norm()
    assert isinstance(conv.norm, torch.nn.Identity) and conv.bias is not None
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_fold_function_keeps_a_conv_bias_and_checks_channels() -> None:
    norm = FrozenBatchNorm2d(4).double()
    _randomise_frozen_bn(norm)
    weight, bias = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    w2, b2 = fold_frozen_batch_norm(weight, bias, norm)
    torch.testing.assert_close(F.conv2d(x, w2, b2), norm(F.conv2d(x, weight, bias)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="4 channels into a convolution with 5"):
        fold_frozen_batch_norm(torch.randn(5, 2, 1, 1), None, norm)


def test_fold_whole_resnet_float64_and_group_norm_untouched() -> None:
    torch.manual_seed(0)
    backbone = ResNet(50, stem_channels=8, base_width=4, num_blocks=(1, 2, 1, 1)).double().eval()
    _randomise_frozen_bn(backbone)
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    expected = backbone(x)
    convs = sum(isinstance(m, Conv2dNorm) for m in backbone.modules())
    assert fold_frozen_batch_norms(backbone) == convs
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    for name, out in backbone(x).items():
        torch.testing.assert_close(out, expected[name], rtol=1e-10, atol=1e-10)
    assert fold_frozen_batch_norms(ResNet(50, stem_channels=8, base_width=4, num_blocks=(1, 1, 1, 1),
                                          norm="gn")) == 0


# ---- optimize_for_inference: fp32 ----------------------------------------------------------------------
def test_fp32_optimised_matches_and_leaves_the_original_alone() -> None:
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = model.batch([_image()])
    policy = ReplayPolicy()
    with torch.no_grad():
        ref = model(batch, policy=policy)
    fast = optimize_for_inference(model, "fp32", channels_last=True)
    assert isinstance(fast, InferenceFocusDETR) and isinstance(fast, focus_detr.FocusDETR)
    assert fast.folded_norms == sum(isinstance(m, Conv2dNorm) for m in model.modules()) > 0
    out = fast(batch, policy=policy.replay())
    torch.testing.assert_close(out.main.logits, ref.main.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.main.boxes, ref.main.boxes, rtol=0, atol=1e-5)
    assert torch.equal(fast(batch).proposal_indices, ref.proposal_indices)
    # predict() is the same method, detections equal
    image = _image().permute(1, 2, 0).to(torch.uint8).numpy()
    model.cfg = fast.cfg = make_config(model.cfg, test_short_side=160, test_max_size=192)  # a small resize
    a, b = model.predict(image, max_detections=20), fast.predict(image, max_detections=20)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-2)
    # the original keeps its FrozenBN, its weights and its class
    assert type(model) is focus_detr.FocusDETR
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_optimised_model_is_inference_only(tmp_path: Path) -> None:
    fast = optimize_for_inference(_tiny(norm="gn"), "fp32")
    with pytest.raises(InferenceOnlyError, match="cannot be trained"):
        fast.train()
    fast.eval()  # train(False) is fine
    with pytest.raises(InferenceOnlyError, match="save the original"):
        focus_detr.save(fast, tmp_path / "x.pt")
    with pytest.raises(InferenceOnlyError, match="save the original"):
        fast.save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(InferenceOnlyError, match="no training targets"):
        fast(fast.batch([_image()]), targets=[{"labels": torch.zeros(0, dtype=torch.long),
                                               "boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="already optimised"):
        optimize_for_inference(fast, "fp32")
    assert not any(p.requires_grad for p in fast.parameters())
    assert "inference only" in repr(fast)


def test_precision_errors_are_one_line() -> None:
    model = _tiny(norm="gn")
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device") as e:
        optimize_for_inference(model, "fp16")
    assert "\n" not in str(e.value)
    with pytest.raises(PrecisionError, match="one of fp32, bf16, fp16"):
        optimize_for_inference(model, "int8")


def test_cli_choices_match_the_library() -> None:
    from focus_detr.cli.options import PRECISION_CHOICES

    assert PRECISION_CHOICES == PRECISIONS


# ---- bf16 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs():
    """fp32 reference (decisions recorded) and the bf16 model, on two images of different content."""
    model = _tiny(seed=1)
    batch = model.batch([_image(0), _image(1, (128, 176))])
    policy = ReplayPolicy()
    with torch.no_grad():
        ref = model(batch, policy=policy)
    return model, batch, policy, ref, _bf16(model)


def test_bf16_forced_decisions_within_bounds(tiny_runs) -> None:
    model, batch, policy, ref, fast = tiny_runs
    out = fast(batch, policy=policy.replay())
    assert out.main.logits.dtype == out.main.boxes.dtype == torch.float32
    assert (out.main.logits - ref.main.logits).abs().max() <= LOGIT_BOUND
    assert (out.main.logits.sigmoid() - ref.main.logits.sigmoid()).abs().max() <= SCORE_BOUND
    assert (out.main.boxes - ref.main.boxes).abs().max() <= BOX_BOUND
    assert (out.foreground_logits - ref.foreground_logits).abs().max() <= FOREGROUND_BOUND
    # it is really computing in bf16 somewhere (else the test would prove nothing)
    assert out.memory.dtype == torch.bfloat16
    assert (out.main.logits - ref.main.logits).abs().max() > 1e-4


def test_bf16_free_run_keeps_the_queries(tiny_runs) -> None:
    model, batch, _, ref, fast = tiny_runs
    out = fast(batch)
    for a, b in zip(out.proposal_indices, ref.proposal_indices):
        overlap = len(set(a.tolist()) & set(b.tolist())) / len(b)
        assert overlap >= MIN_FREE_QUERY_OVERLAP


def test_bf16_weights_cast_once_heads_float32(tiny_runs) -> None:
    fast = tiny_runs[4]
    assert fast.backbone.stem.conv1.weight.dtype == torch.bfloat16
    assert fast.encoder.layers[0].cross_attn.value_proj.weight.dtype == torch.bfloat16
    assert fast.encoder.layers[0].oesm_attn.in_proj_weight.dtype == torch.bfloat16
    for name in FLOAT32_MODULES:
        for p in fast.get_submodule(name).parameters():
            assert p.dtype == torch.float32, name
    assert fast.level_embed.dtype == torch.float32
    # the float32 heads keep their parameter names (only the folded backbone convolutions change theirs)
    def outside_backbone(state):
        return {k for k in state if not k.startswith("backbone.")}

    assert outside_backbone(fast.state_dict()) == outside_backbone(tiny_runs[0].state_dict())


def test_bf16_on_a_cpu_without_bf16_units_warns(monkeypatch) -> None:
    from focus_detr.model import optimize

    monkeypatch.setattr(optimize, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="slower than fp32"):
        optimize_for_inference(_tiny(norm="gn"), "bf16")


# ---- autocast policy (issue #14 item 6), on CPU with bfloat16 ------------------------------------------------
class SpyImplementation:
    """A deformable-attention implementation that records the dtypes it sees, then runs the reference."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.dtype, torch.dtype, torch.dtype, bool]] = []

    def __call__(self, value, spatial_shapes, locations, weights):
        self.calls.append((value.dtype, locations.dtype, weights.dtype, torch.is_autocast_enabled("cpu")))
        return msda.ms_deform_attn_reference(value, spatial_shapes, locations, weights)


@pytest.fixture
def spy():
    spy = SpyImplementation()
    previous = msda.current_implementation()
    msda.register_implementation("spy", spy)
    msda.select_implementation("spy")
    try:
        yield spy
    finally:
        msda.select_implementation(previous)
        msda._IMPLEMENTATIONS.pop("spy", None)


def _assert_sampling_float32(spy: SpyImplementation, expected_calls: int) -> None:
    assert len(spy.calls) == expected_calls
    for value_dtype, loc_dtype, weight_dtype, autocast_on in spy.calls:
        assert value_dtype == loc_dtype == weight_dtype == torch.float32
        assert not autocast_on


def test_autocast_sampling_sees_float32(spy) -> None:
    model = _tiny(norm="gn")
    batch = model.batch([_image()])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    layers = model.cfg.encoder.num_layers + model.cfg.decoder.num_layers
    _assert_sampling_float32(spy, layers)
    assert out.memory.dtype == torch.bfloat16  # autocast really was on around it
    spy.calls.clear()
    _bf16(model)(batch)
    _assert_sampling_float32(spy, layers)


def test_autocast_with_float32_heads_ranks_float32_and_stays_close() -> None:
    """The policy for mixed-precision users (AMP training / inference without optimize_for_inference):
    ``keep_heads_in_float32`` + autocast. Weights stay float32, so it also trains."""
    model = _tiny(seed=2)
    batch = model.batch([_image(2, (96, 128))])
    policy = ReplayPolicy()
    with torch.no_grad():
        ref = model(batch, policy=policy)
    amp = keep_heads_in_float32(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(batch, policy=policy.replay())  # ReplayPolicy asserts float32 scores at every top-k
    assert out.foreground_logits.dtype == out.proposal_max_logits.dtype == torch.float32
    assert (out.main.logits - ref.main.logits).abs().max() <= LOGIT_BOUND
    assert (out.main.boxes - ref.main.boxes).abs().max() <= BOX_BOUND
    # gradients still flow through the float32 heads under autocast
    amp.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = amp(batch).main.logits.float().sum()
    loss.backward()
    assert amp.class_heads[-1].weight.grad is not None


# ---- parity weights (official R50 architecture, weights from the fixture rule) ------------------------------
def test_bf16_on_the_parity_weights_top100_within_bounds() -> None:
    from parity_utils import fixture_dirs, load_fixture

    fx = load_fixture(fixture_dirs()[0])
    model = focus_detr.load_official(fx.official_state_dict(focus_detr.build_model(fx.cfg)), fx.preset,
                                     **fx.overrides)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # One fixture image at a quarter of its size: the R50 forward in bf16 is emulated (slow) on AVX2 CPUs.
    image = F.interpolate(fx.images()[0][None].float(), size=(96, 128), mode="bilinear")[0].round()
    batch = model.batch([image])
    policy = ReplayPolicy()
    with torch.no_grad():
        ref = model(batch, policy=policy)
    num_classes = ref.main.logits.shape[-1]
    top = ref.main.logits.sigmoid().flatten(1).topk(100).indices[0]
    queries = top // num_classes
    out = _bf16(model)(batch, policy=policy.replay())
    scores = out.main.logits.sigmoid().flatten(1)[0, top]
    ref_scores = ref.main.logits.sigmoid().flatten(1)[0, top]
    assert (scores - ref_scores).abs().max() <= SCORE_BOUND
    assert (out.main.boxes[0, queries] - ref.main.boxes[0, queries]).abs().max() <= BOX_BOUND
    assert (out.foreground_logits - ref.foreground_logits).abs().max() <= FOREGROUND_BOUND
    assert (scores - ref_scores).abs().max() > 0  # bf16 really ran


# ---- command line ------------------------------------------------------------------------------------------
def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, timeout=600)


def test_cli_predict_precision_and_refusals(tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    Image.fromarray(_image().permute(1, 2, 0).to(torch.uint8).numpy()).save(picture)
    weights = focus_detr.save(_tiny(norm="gn"), tmp_path / "tiny.pt")
    proc = _run("predict", str(weights), str(picture), "--out", str(tmp_path / "bf16"), "--precision", "bf16",
                "--no-draw", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "bf16" in proc.stderr and (tmp_path / "bf16" / "results.json").is_file()
    proc = _run("predict", str(weights), str(picture), "--out", str(tmp_path / "fp16"), "--precision", "fp16",
                "--device", "cpu")
    assert proc.returncode == 2
    assert "--precision fp16: precision fp16 needs a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run("export", str(weights), "--format", "onnx", str(tmp_path / "m.onnx"), "--precision", "bf16")
    assert proc.returncode == 2 and "not supported by export" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.onnx").exists()
    results = np.array([r["score"] for r in __import__("json").loads((tmp_path / "bf16" / "results.json").read_text())])
    assert ((results >= 0) & (results <= 1)).all()
