"""One preprocessing path: ``model.preprocess.preprocess`` and the one resize rule ``ops.images.resized_shape``,
shared by predict, explain, the ONNX runner and the evaluation transforms; and the layering it relies on
(ops torch-only, decoding in data, the model importing data's decoder only where README says)."""

from __future__ import annotations

import ast
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from focus_detr import FocusDETRConfig, build_model
from focus_detr.data.image_io import to_rgb_array
from focus_detr.data.transforms import ResizeShortestEdge, build_test_transforms
from focus_detr.model.preprocess import preprocess
from focus_detr.ops.images import resized_shape

SRC = Path(__file__).resolve().parents[2] / "src" / "focus_detr"


def _target() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


# --------------------------------------------------------------------------------------------------
# The rule


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), short=st.integers(1, 1600), max_size=st.integers(1, 3000))
def test_one_resize_rule(h: int, w: int, short: int, max_size: int) -> None:
    new_h, new_w = resized_shape(h, w, short, max_size)
    assert (new_h, new_w) == ResizeShortestEdge.get_output_shape(h, w, short, max_size)
    # What the rule promises: >= 1 px; the long side never above max_size (up to rounding); the short side
    # is `short` unless the cap shrank the image; the aspect ratio is kept to within rounding.
    assert new_h >= 1 and new_w >= 1
    assert max(new_h, new_w) <= max_size
    if max(h, w) * short / min(h, w) <= max_size:
        assert min(new_h, new_w) == short
    else:
        assert max(new_h, new_w) == max_size
    assert abs(new_h * w - new_w * h) <= h + w  # each side within one pixel of the exact ratio


def test_resize_rule_is_detectron2s_on_exact_ties() -> None:
    # 11 x 22 -> short 800 gives a 1600 long side, capped to 1333: the short side is 666.5 exactly, and
    # detectron2's arithmetic (short side set, not h * scale) lands just below the tie: 666.
    assert resized_shape(11, 22, 800, 1333) == (666, 1333)
    assert resized_shape(22, 11, 800, 1333) == (1333, 666)


# --------------------------------------------------------------------------------------------------
# preprocess == the evaluation transform


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 96), w=st.integers(1, 96), short=st.integers(8, 64), max_size=st.integers(8, 128),
       seed=st.integers(0, 2**16))
def test_preprocess_matches_the_evaluation_transform(h: int, w: int, short: int, max_size: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    tensor, original = preprocess(image, (short, max_size))
    evaluated, _ = build_test_transforms(short, max_size)(image, _target())
    assert original == (h, w)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, *resized_shape(h, w, short, max_size))
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(evaluated))  # same size, same pixels


def test_preprocess_takes_the_config_and_never_aliases_the_input() -> None:
    cfg = FocusDETRConfig(test_short_side=32, test_max_size=48)
    image = np.full((40, 20, 3), 7, dtype=np.uint8)
    tensor, original = preprocess(image, cfg)
    assert original == (40, 20) and tuple(tensor.shape) == (3, 48, 24)
    same, _ = preprocess(np.full((32, 32, 3), 7, dtype=np.uint8), cfg)  # already the right size
    same[0, 0, 0] = 99
    assert tuple(same.shape) == (3, 32, 32) and same.is_contiguous()
    image_copy = image.copy()
    tensor[:] = 0
    assert np.array_equal(image, image_copy)


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((4, 4), dtype=np.uint8), "shape (4, 4)"),
    (np.zeros((4, 4, 3), dtype=np.float32), "dtype float32"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "non-empty"),
    ("photo.jpg", "got str"),
])
def test_preprocess_refuses_undecoded_input_in_one_line(bad, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        preprocess(bad, (32, 48))
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert "to_rgb_array" in str(info.value) or "non-empty" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Every caller goes through it


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny", test_short_side=64, test_max_size=96, num_classes=3).eval()


def test_predict_and_explain_see_the_preprocessed_image(tiny_model, tmp_path: Path) -> None:
    from focus_detr.inference import explain

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(50, 130, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    network_input, original = preprocess(image, tiny_model.cfg)
    with torch.no_grad():
        outputs = tiny_model(tiny_model.batch([network_input]))
        expected = tiny_model.postprocess(outputs, torch.tensor([original]))[0]
    for source in (image, path, str(path), Image.fromarray(image)):
        got = tiny_model.predict(source)
        assert torch.equal(got.boxes, expected.boxes) and torch.equal(got.scores, expected.scores)
    arrays = explain(tiny_model, path).arrays
    assert tuple(arrays["input_size"]) == tuple(network_input.shape[1:]) == resized_shape(50, 130, 64, 96)
    assert tuple(arrays["image_size"]) == original


def test_onnx_runner_prepares_with_preprocess() -> None:
    from focus_detr.export import OnnxDetector

    runner = OnnxDetector.__new__(OnnxDetector)  # prepare needs only the config (no file, no onnxruntime)
    runner.cfg = FocusDETRConfig(test_short_side=96, test_max_size=160)  # inputs >= 65 px, as export takes
    image = np.random.default_rng(2).integers(0, 256, size=(30, 70, 3), dtype=np.uint8)
    x, original = runner.prepare(image)
    network_input, expected_original = preprocess(image, runner.cfg)
    assert tuple(network_input.shape) == (3, 69, 160)
    assert original == expected_original and x.dtype == np.float32
    assert np.array_equal(x[0], network_input.numpy().astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Layering


def _imports(file: Path) -> list[tuple[str, str | None]]:
    """``(absolute module, name of the innermost enclosing function or None)`` for every import in ``file``."""
    tree = ast.parse(file.read_text())
    package = "focus_detr." + ".".join(file.relative_to(SRC).with_suffix("").parts[:-1])
    enclosing: dict[int, str] = {}
    for function in ast.walk(tree):  # outer functions first, so inner ones overwrite
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            enclosing.update({id(n): function.name for n in ast.walk(function)})
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rstrip(".").split(".")
                base = base[:len(base) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        out.extend((name, enclosing.get(id(node))) for name in names)
    return out


def test_ops_is_torch_only() -> None:
    allowed = {"torch", "numpy", "focus_detr"}
    for file in sorted((SRC / "ops").glob("*.py")):
        for name, _function in _imports(file):
            root = name.split(".")[0]
            assert root in allowed or root in sys.stdlib_module_names, f"ops/{file.name} imports {name}"
            if root == "focus_detr":
                assert name.startswith("focus_detr.ops"), f"ops/{file.name} imports {name}"


def test_decoding_is_a_leaf_of_data_and_data_stays_below_the_model() -> None:
    leaf = {"focus_detr.data.image_io", "focus_detr.data.url_io", "focus_detr.data.errors"}
    for file in sorted((SRC / "data").glob("*.py")):
        module = f"focus_detr.data.{file.stem}"
        for name, _function in _imports(file):
            if not name.startswith("focus_detr"):
                continue
            assert name.startswith(("focus_detr.data", "focus_detr.ops")), f"data/{file.name} imports {name}"
            if module in leaf:
                assert name in leaf, f"data/{file.name} is a decoding leaf but imports {name}"


def test_model_imports_data_only_for_decoding_inside_predict_and_plot() -> None:
    # README "Layout": FocusDETR.predict (and Detections.plot) decode paths / URLs / PIL / arrays with
    # data.image_io, imported inside the method; nothing else of data, losses, engine or cli.
    exceptions = {("detector.py", "predict"), ("postprocess.py", "plot")}
    found = set()
    for file in sorted((SRC / "model").glob("*.py")):
        for name, function in _imports(file):
            if not name.startswith(("focus_detr.data", "focus_detr.losses", "focus_detr.engine", "focus_detr.cli")):
                continue
            where = (file.name, function)
            assert name == "focus_detr.data.image_io" and where in exceptions, \
                f"model/{file.name} imports {name} in {function or 'the module'}"
            found.add(where)
    assert found == exceptions


def test_one_device_resolver() -> None:
    # Every resolution of a device name goes through focus_detr.devices.resolve_device.
    definitions = []
    for file in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "resolve_device":
                definitions.append(str(file.relative_to(SRC)))
    assert definitions == ["devices.py"]


def test_training_augmentation_still_uses_the_rule() -> None:
    image = np.zeros((30, 60, 3), dtype=np.uint8)
    out, _ = ResizeShortestEdge((20, 40), 70)(image, _target(), random.Random(0))
    assert out.shape[:2] in {resized_shape(30, 60, 20, 70), resized_shape(30, 60, 40, 70)}


def test_to_rgb_array_then_preprocess_is_what_predict_reads(tmp_path: Path) -> None:
    grey16 = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50)
    path = tmp_path / "g.png"
    Image.fromarray(grey16).save(path)
    tensor, original = preprocess(to_rgb_array(path), (20, 40))
    assert original == (40, 30) and tuple(tensor.shape) == (3, *resized_shape(40, 30, 20, 40))
