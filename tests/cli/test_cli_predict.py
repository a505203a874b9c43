"""End-to-end tests of `focus-detr predict` and `focus-detr explain` (real console script, tiny model, CPU),
plus the Python API behind them (focus_detr.inference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_utils import make_picture, run_cli, save_tiny_weights
from focus_detr.inference import discover_images, explain, load_model, predict_to_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """tiny weights + a folder of good pictures of different sizes and pixel modes."""
    root = tmp_path_factory.mktemp("predict")
    save_tiny_weights(root / "tiny.pt")
    good = root / "good"
    make_picture(good / "a.jpg", (120, 160), 1)
    make_picture(good / "sub" / "b.png", (90, 200), 2)
    make_picture(good / "sub" / "gray.png", (150, 110), 3, mode="L")
    make_picture(good / "sub" / "deeper" / "rgba.png", (100, 100), 4, mode="RGBA")
    (good / ".hidden").mkdir()
    make_picture(good / ".hidden" / "skipped.jpg", (64, 64), 5)  # hidden folders are not searched
    (good / "notes.txt").write_text("not an image, and not named like one: ignored when searching folders")
    return root


def coco_load(images_json: Path, results_json: Path):
    from pycocotools.coco import COCO

    gt = COCO(str(images_json))
    return gt, gt.loadRes(str(results_json))


# --------------------------------------------------------------------------------------------------
# predict


def test_predict_folder_end_to_end(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("predict", workspace / "tiny.pt", workspace / "good", "--out", out, "--batch-size", "2",
                   "--score-threshold", "0", "--max-detections", "20")
    assert proc.returncode == 0, proc.stderr
    assert "4 image(s)" in proc.stdout
    images = json.loads((out / "images.json").read_text())
    assert sorted(im["file_name"] for im in images["images"]) == ["a.jpg", "sub/b.png", "sub/deeper/rgba.png",
                                                                 "sub/gray.png"]
    assert images["failed"] == []
    assert len(images["categories"]) == 80 and images["categories"][0] == {"id": 0, "name": "person"}
    # The results file is COCO results format: pycocotools loads it against the images file.
    gt, res = coco_load(out / "images.json", out / "results.json")
    assert len(res.anns) == 4 * 20  # threshold 0: every image keeps max-detections boxes
    for ann in res.anns.values():
        image = gt.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] + 0.01 and y + h <= image["height"] + 0.01
        assert 0.0 <= ann["score"] <= 1.0
    # One annotated picture per input: the input's size, plus (20 crowded detections on a small picture) a
    # legend strip below it for the tags that did not fit.
    for im in images["images"]:
        source = Path(im["path"])
        picture = out / "annotated" / im["file_name"]
        with Image.open(picture) as p, Image.open(source) as s:
            assert s.size == (im["width"], im["height"])
            assert p.width >= s.width and p.height > s.height
            assert p.mode == "RGB"


def test_predict_bad_inputs_are_reported_and_skipped(workspace: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    make_picture(folder / "good.jpg", (96, 128), 7)
    raw = (folder / "good.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(raw[: len(raw) // 3])  # truncated JPEG
    (folder / "empty.png").write_bytes(b"")  # zero bytes
    (folder / "letter.jpg").write_text("Dear reader, this is a text file with an image name.\n")
    out = tmp_path / "out"
    proc = run_cli("predict", workspace / "tiny.pt", folder, "--out", out, "--score-threshold", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in ("corrupt.jpg", "empty.png", "letter.jpg"):
        assert name in proc.stderr, proc.stderr
    assert "3 input(s) failed" in proc.stderr
    assert "good.jpg" not in proc.stderr
    images = json.loads((out / "images.json").read_text())
    assert [im["file_name"] for im in images["images"]] == ["good.jpg"]
    assert sorted(Path(f["path"]).name for f in images["failed"]) == ["corrupt.jpg", "empty.png", "letter.jpg"]
    gt, res = coco_load(out / "images.json", out / "results.json")
    assert {a["image_id"] for a in res.anns.values()} == {images["images"][0]["id"]}
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["good.jpg"]


def test_predict_files_globs_and_missing_inputs(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = workspace / "good"
    proc = run_cli("predict", workspace / "tiny.pt", good / "a.jpg", str(good / "sub" / "*.png"),
                   good / "a.jpg", tmp_path / "does-not-exist.jpg", "--out", out, "--no-draw", "--quiet")
    assert proc.returncode == 1  # one input does not exist: reported, the others still processed
    assert "does-not-exist.jpg: no such file or folder" in proc.stderr
    images = json.loads((out / "images.json").read_text())
    names = sorted(Path(im["path"]).name for im in images["images"])
    assert names == ["a.jpg", "b.png", "gray.png"]  # a.jpg given twice, processed once
    assert not (out / "annotated").exists()


def test_predict_random_init_without_weights(workspace: Path, tmp_path: Path) -> None:
    proc = run_cli("predict", "--preset", "tiny", "--random-init", workspace / "good" / "a.jpg",
                   "--out", tmp_path / "o", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr
    assert (tmp_path / "o" / "annotated" / "a.jpg").is_file()


@pytest.mark.parametrize("args, code, message", [
    (["predict", "{w}", "{tmp}/nothing-here", "--out", "{tmp}/o"], 2, "no images or videos found"),
    (["predict", "{tmp}/missing.pt", "{good}", "--out", "{tmp}/o"], 1, "no such weights file"),
    (["predict", "{good}/a.jpg", "{good}", "--out", "{tmp}/o"], 1, "not a readable checkpoint"),
    (["predict", "--random-init", "{good}", "--out", "{tmp}/o"], 2, "--random-init needs --preset"),
    (["predict", "{w}", "{good}", "--out", "{tmp}/o", "--device", "cuda:7"], 2, "CUDA is not available"),
    (["predict", "{w}", "{good}", "--out", "{tmp}/o", "--batch-size", "0"], 2, "must be >= 1"),
])
def test_predict_usage_errors(workspace: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    fill = {"w": workspace / "tiny.pt", "tmp": tmp_path, "good": workspace / "good"}
    # The CUDA case must see no GPU, also on a machine that has one: hide them from the subprocess.
    proc = run_cli(*[a.format(**fill) for a in args], env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_python_api_matches_model_predict(workspace: Path, tmp_path: Path) -> None:
    model, description = load_model(workspace / "tiny.pt")
    assert "weights file" in description
    seen = []
    summary = predict_to_folder(model, [workspace / "good"], tmp_path, batch_size=3, score_threshold=0.0,
                                max_detections=10, on_result=seen.append)
    assert summary.ok and summary.num_images == 4 and summary.num_detections == 40
    # Batched results equal one-by-one model.predict on the same files (the model is batch-invariant).
    for result in seen:
        alone = model.predict(result.path, score_threshold=0.0, max_detections=10)
        assert torch.allclose(result.detections.scores, alone.scores, atol=1e-5)
        assert torch.allclose(result.detections.boxes, alone.boxes, atol=1e-3)
        assert torch.equal(result.detections.labels, alone.labels)


def test_discover_images(tmp_path: Path) -> None:
    make_picture(tmp_path / "b.JPG", (20, 20), 0)
    make_picture(tmp_path / "a.png", (20, 20), 0)
    make_picture(tmp_path / "deep" / "c.webp", (20, 20), 0)
    make_picture(tmp_path / ".cache" / "d.png", (20, 20), 0)
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "empty").mkdir()
    paths, problems = discover_images([tmp_path, tmp_path / "a.png", tmp_path / "readme.md",
                                       str(tmp_path / "*.png"), str(tmp_path / "*.gif"), tmp_path / "empty"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.png", "b.JPG", "deep/c.webp", "readme.md"]
    assert [(Path(p.path).name, p.reason.split()[0]) for p in problems] == [("*.gif", "the"), ("empty", "no")]
    flat, _ = discover_images([tmp_path], recursive=False)
    assert [p.name for p in flat] == ["a.png", "b.JPG"]


def test_category_ids_from_annotation_file(workspace: Path, tmp_path: Path) -> None:
    model, _ = load_model(workspace / "tiny.pt")
    names = model.cfg.class_names
    coco_ids = [i + 1 + i // 10 for i in range(len(names))]  # gaps, like COCO's 1..90
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"categories": [{"id": c, "name": n} for c, n in zip(coco_ids, names)]}))
    summary = predict_to_folder(model, [workspace / "good" / "a.jpg"], tmp_path / "o", score_threshold=0.0,
                                max_detections=30, draw=False, categories_file=ann)
    records = json.loads(summary.results_file.read_text())
    assert {r["category_id"] for r in records} <= set(coco_ids)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(ValueError, match="no category named"):
        predict_to_folder(model, [workspace / "good" / "a.jpg"], tmp_path / "o2", categories_file=bad)


def test_detections_interop(workspace: Path) -> None:
    model, _ = load_model(workspace / "tiny.pt")
    det = model.predict(workspace / "good" / "a.jpg", score_threshold=0.0, max_detections=5)
    records = det.to_coco(image_id=7)
    assert len(records) == 5 and all(r["image_id"] == 7 and len(r["bbox"]) == 4 for r in records)
    sv = pytest.importorskip("supervision", reason="optional package 'supervision' is not installed")
    converted = det.to_supervision()
    assert isinstance(converted, sv.Detections)
    np.testing.assert_allclose(converted.xyxy, det.boxes.numpy(), rtol=1e-6)
    np.testing.assert_allclose(converted.confidence, det.scores.numpy(), rtol=1e-6)
    assert converted.class_id.tolist() == det.labels.tolist()
    assert list(converted.data["class_name"]) == det.names


# --------------------------------------------------------------------------------------------------
# explain


def test_explain_end_to_end(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "explain"
    proc = run_cli("explain", workspace / "tiny.pt", workspace / "good" / "sub" / "b.png", "--out", out,
                   "--score-threshold", "0.02", "--dpi", "60")
    assert proc.returncode == 0, proc.stderr
    # The figure: one panel per feature level (4), per encoder layer (2) and per layer's OESM tokens (2).
    assert "levels 4" in proc.stdout and "layers 2" in proc.stdout and "oesm 2" in proc.stdout
    with Image.open(out / "explain.png") as fig:
        assert fig.format == "PNG" and fig.size[0] > 600
    with np.load(out / "explain_arrays.npz") as arrays:
        keys = set(arrays.files)
        assert {f"foreground_prob_level{level}" for level in range(4)} <= keys
        assert {f"selected_layer{k}_level{level}" for k in range(2) for level in range(4)} <= keys
        assert {f"oesm_layer{k}_level{level}" for k in range(2) for level in range(4)} <= keys
        assert arrays["image_size"].tolist() == [90, 200]
        h, w = arrays["input_size"].tolist()
        assert min(h, w) == 320 or max(h, w) == 512  # the tiny preset's test-time resize
        # The finest level covers the network input at stride 8.
        assert arrays["foreground_prob_level0"].shape == (-(-h // 8), -(-w // 8))
        counts = arrays["selected_count"].tolist()
        assert counts[0] > counts[1] > 0  # the cascade keeps fewer tokens in later layers
        assert (arrays["det_scores"] >= 0.02).all()
    detections = json.loads((out / "detections.json").read_text())
    assert detections["width"] == 200 and detections["height"] == 90
    assert len(detections["detections"]) == len(np.load(out / "explain_arrays.npz")["det_scores"])


def test_explain_python_api(workspace: Path) -> None:
    pytest.importorskip("matplotlib")
    model, _ = load_model(workspace / "tiny.pt")
    image = np.asarray(Image.open(workspace / "good" / "a.jpg"))
    figure, arrays, detections = explain(model, image, score_threshold=0.0, max_detections=7)
    assert figure.focus_detr_panels == {"image": 1, "levels": 4, "summary": 1, "layers": 2, "oesm": 2}
    assert len(detections) == 7
    assert (detections.boxes[:, 2] <= 160).all() and (detections.boxes[:, 3] <= 120).all()  # original pixels
    # The arrays agree with the model's own trace on the same input.
    alone = model.predict(image, score_threshold=0.0, max_detections=7)
    assert torch.allclose(alone.scores, detections.scores, atol=1e-6)
    oesm_total = sum(int(arrays[f"oesm_layer0_level{level}"].sum()) for level in range(4))
    assert oesm_total == model.cfg.encoder.oesm_topk


def test_explain_errors(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    proc = run_cli("explain", workspace / "tiny.pt", bad, "--out", tmp_path / "o")
    assert proc.returncode == 1 and "bad.jpg" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("explain", workspace / "tiny.pt", workspace / "good" / "a.jpg", workspace / "good" / "a.jpg",
                   "--out", tmp_path / "o")
    assert proc.returncode == 2 and "one image" in proc.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
