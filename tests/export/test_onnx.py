"""ONNX export: the export-friendly forward equals the model, and the exported graph run by onnxruntime
matches PyTorch on image sizes other than the one traced (the input size is dynamic).

Tolerances (float32, CPU): logits 1e-4 and boxes 1e-5 absolute (observed: ~4e-6 and ~1e-7, the
differences of onnxruntime's and PyTorch's kernels); post-processed scores 1e-5; labels and boxes must agree
for every detection whose score is not within 1e-5 of another (near-ties may legally swap ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import focus_detr
from focus_detr.ops import ms_deform_attn as msda
from focus_detr.export.onnx import MIN_SIZE, ExportableFocusDETR, default_example_size
from cli_utils import make_picture, run_cli, save_tiny_weights

LOGITS_ATOL = 1e-4
BOXES_ATOL = 1e-5
SCORES_ATOL = 1e-5


@pytest.fixture
def reference_msda():
    """Both sides on the reference deformable-attention core, so the comparison below is exact."""
    previous = msda.current_implementation()
    msda.select_implementation("reference")
    yield
    msda.select_implementation(previous)


@pytest.mark.parametrize("size,query_nms_iou", [((320, 427), None), ((97, 130), None), ((512, 300), None),
                                                ((MIN_SIZE, 200), None), ((320, 427), 0.5), ((MIN_SIZE, 200), 0.5)])
def test_export_forward_equals_model_forward(size: tuple[int, int], query_nms_iou: float | None,
                                             reference_msda) -> None:
    """The export wrapper (the model's forward with the un-padded batch semantics, then the top-K selection)
    computes what FocusDETR.forward and postprocess do."""
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny", **{"decoder.query_nms_iou": query_nms_iou}).eval()
    if query_nms_iou is not None:  # large equal proposal boxes, so the distinct-query selection changes queries
        with torch.no_grad():
            model.proposal_box_head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 3.0, 3.0]))
    wrapper = ExportableFocusDETR(model).eval()
    image = torch.randint(0, 256, (3, *size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(model.batch([image]))
        logits, boxes, scores, labels, xyxy, queries = wrapper(image[None].float())
        det = model.postprocess(ref, max_detections=None)[0]
    assert torch.equal(logits, ref.main.logits) and torch.equal(boxes, ref.main.boxes)
    assert torch.equal(scores[0], det.scores)
    assert torch.equal(labels[0], det.labels) and torch.equal(queries[0], det.query_indices)
    # Only the pixel scaling differs (one multiplication by the size instead of two as postprocess does).
    torch.testing.assert_close(xyxy[0], det.boxes, rtol=0, atol=1e-4)
    assert "_onnx_export" not in msda.available_implementations()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """``focus-detr export`` of the tiny preset through the console script (one export, 1-2 min on 2 cores)."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=f"optional package {module!r} not installed (pip install onnx onnxscript "
                                           "onnxruntime); the ONNX export test needs it")
    root = tmp_path_factory.mktemp("onnx")
    # The demo's configuration: distinct query selection on, with large equal proposal boxes so that it
    # actually reorders the queries (the graph then holds the Fast-NMS ops too).
    torch.manual_seed(3)
    model = focus_detr.build_model("tiny", **{"decoder.query_nms_iou": 0.5})
    with torch.no_grad():
        model.proposal_box_head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 3.0, 3.0]))
    weights = focus_detr.save(model, root / "tiny.pt")
    out = root / "tiny.onnx"
    proc = run_cli("export", weights, "--format", "onnx", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "weights": weights, "onnx": out, "stdout": proc.stdout}


@pytest.mark.slow
def test_export_cli_reports_its_own_check(exported: dict) -> None:
    stdout = exported["stdout"]
    assert "opset 18" in stdout and "dynamic height/width" in stdout
    assert stdout.count("-> ok") == 2


@pytest.mark.slow
def test_onnx_graph_has_dynamic_size_and_metadata(exported: dict) -> None:
    import onnx

    model = onnx.load(str(exported["onnx"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[1].dim_value == 3
    assert dims[2].dim_param and dims[3].dim_param  # symbolic: any height and width
    assert {o.name for o in model.graph.output} == {"logits", "boxes", "scores", "labels", "boxes_xyxy",
                                                   "query_indices"}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["focus_detr_config"])["embed_dim"] == 64
    assert any(op.domain in ("", "ai.onnx") and op.version == 18 for op in model.opset_import)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 352), (416, 288)])
def test_onnxruntime_matches_pytorch_on_other_sizes(exported: dict, size: tuple[int, int]) -> None:
    from focus_detr.export.runtime import detections_agree, onnx_session

    model = focus_detr.load(exported["weights"])
    assert size != default_example_size(model.cfg)  # the traced size is 320x427
    session = onnx_session(exported["onnx"])
    image = torch.randint(0, 256, (3, *size), generator=torch.Generator().manual_seed(sum(size)), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(model.batch([image]))
        det = model.postprocess(ref, max_detections=None)[0]
    logits, boxes, scores, labels, xyxy, queries = session.run(None, {"image": image[None].float().numpy()})
    # The number of tokens, queries and the token budgets follow the size (nothing frozen at 320x427).
    assert logits.shape == tuple(ref.main.logits.shape) and scores.shape == (1, det.scores.numel())
    np.testing.assert_allclose(logits, ref.main.logits.numpy(), rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(boxes, ref.main.boxes.numpy(), rtol=0, atol=BOXES_ATOL)
    np.testing.assert_allclose(np.sort(scores[0]), np.sort(det.scores.numpy()), rtol=0, atol=SCORES_ATOL)
    assert detections_agree(scores[0], labels[0], xyxy[0], det)


@pytest.mark.slow
def test_onnx_detector_on_image_files(exported: dict) -> None:
    from focus_detr.export import OnnxDetector

    detector = OnnxDetector(exported["onnx"])
    model = focus_detr.load(exported["weights"])
    for i, size in enumerate([(150, 200), (480, 360)]):
        path = make_picture(exported["root"] / f"img{i}.png", size, seed=i)
        ours = detector.predict(path, score_threshold=0.0, max_detections=20)
        ref = model.predict(path, score_threshold=0.0, max_detections=20)
        np.testing.assert_allclose(ours.scores.numpy(), ref.scores.numpy(), rtol=0, atol=SCORES_ATOL)
        # Boxes in original pixels (resized back from the network input).
        assert float(ours.boxes[:, 2].max()) <= size[1] + 1e-3 and float(ours.boxes[:, 3].max()) <= size[0] + 1e-3
        same = ours.labels == ref.labels
        assert same.float().mean() >= 0.9  # near-tied scores may swap a few ranks
        np.testing.assert_allclose(ours.boxes[same].numpy(), ref.boxes[same].numpy(), rtol=0, atol=0.05)


def test_export_without_onnx_packages_says_what_to_install(tmp_path: Path) -> None:
    """A missing optional dependency gives a one-line error naming the packages, not a traceback."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "onnxscript.py").write_text("raise ImportError('onnxscript blocked for this test')\n")
    weights = save_tiny_weights(tmp_path / "tiny.pt")
    proc = run_cli("export", weights, "--format", "onnx", tmp_path / "x.onnx",
                   env_extra={"PYTHONPATH": f"{blocker}:{Path(__file__).resolve().parents[2] / 'src'}"})
    assert proc.returncode == 1
    assert "pip install onnx onnxscript onnxruntime" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.onnx").exists()
