"""Dataset layouts: COCO, Roboflow COCO, YOLO, Pascal VOC and explicit jsons read the same data, train and
evaluate end to end through the command line (YOLO through the console script, the others through
``focus_detr.cli.main.main`` in this process: the same code without a new Python importing torch); a folder
that matches nothing is refused with the trees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from cli_utils import cli_command
from focus_detr.data import CocoDetection, DataError, find_split, make_shapes_dataset, require_split
from focus_detr.data.layouts import CocoJsonSplit, VocSplit, YoloSplit

SPLITS = ("train", "val")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_here(capsys, *args: str) -> str:
    """``focus-detr ARGS`` in this process; returns stdout, failing with the output on a non-zero exit."""
    from focus_detr.cli.main import main

    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 0, f"exit {code}\n{captured.out}\n{captured.err}"
    return captured.out


# --------------------------------------------------------------------------------------------------
# The same synthetic shapes written in each layout (what a Roboflow / Ultralytics / VOC export looks like).


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def write_roboflow(coco_root: Path, out: Path) -> None:
    """Roboflow's COCO export: SPLIT/_annotations.coco.json beside the images, 'valid' for val, and an extra
    category 0 (the project name) that no box uses."""
    for split, folder in (("train", "train"), ("val", "valid")):
        data = _coco(coco_root, split)
        data["categories"] = [{"id": 0, "name": "shapes-x1y2", "supercategory": "none"}] + [
            dict(c, supercategory="shapes-x1y2") for c in data["categories"]]
        shutil.copytree(coco_root / "images" / split, out / folder)
        (out / folder / "_annotations.coco.json").write_text(json.dumps(data))


def write_yolo(coco_root: Path, out: Path) -> list[str]:
    """Ultralytics layout: data.yaml, images/SPLIT, labels/SPLIT (normalised cx cy w h per line)."""
    names = []
    for split in SPLITS:
        data = _coco(coco_root, split)
        ids = sorted(c["id"] for c in data["categories"])
        names = [next(c["name"] for c in data["categories"] if c["id"] == i) for i in ids]
        shutil.copytree(coco_root / "images" / split, out / "images" / split)
        (out / "labels" / split).mkdir(parents=True)
        for img in data["images"]:
            lines = []
            for a in data["annotations"]:
                if a["image_id"] == img["id"]:
                    x, y, w, h = a["bbox"]
                    W, H = img["width"], img["height"]
                    lines.append(f"{ids.index(a['category_id'])} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} "
                                 f"{w / W:.6f} {h / H:.6f}")
            (out / "labels" / split / (Path(img["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    (out / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                   f"nc: {len(names)}\nnames: {json.dumps(names)}\n")
    return names


def write_voc(coco_root: Path, out: Path, difficult_first: bool = False) -> None:
    """Pascal VOC: Annotations/*.xml (1-based inclusive pixel boxes), JPEGImages, ImageSets/Main/SPLIT.txt."""
    (out / "Annotations").mkdir(parents=True)
    (out / "JPEGImages").mkdir()
    (out / "ImageSets" / "Main").mkdir(parents=True)
    for split in SPLITS:
        data = _coco(coco_root, split)
        names = {c["id"]: c["name"] for c in data["categories"]}
        stems = []
        for img in data["images"]:
            stem = f"{split}_{Path(img['file_name']).stem}"
            stems.append(stem)
            shutil.copy(coco_root / "images" / split / img["file_name"], out / "JPEGImages" / f"{stem}.jpg")
            objects = []
            for k, a in enumerate(a for a in data["annotations"] if a["image_id"] == img["id"]):
                x, y, w, h = a["bbox"]
                difficult = int(difficult_first and k == 0)
                objects.append(f"<object><name>{names[a['category_id']]}</name><difficult>{difficult}</difficult>"
                               f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax>"
                               f"<ymax>{y + h}</ymax></bndbox></object>")
            (out / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.jpg</filename><size><width>{img['width']}</width>"
                f"<height>{img['height']}</height><depth>3</depth></size>{''.join(objects)}</annotation>")
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    make_shapes_dataset(root / "coco", 4, 2, seed=5, image_size=(64, 80), objects_per_image=(1, 3),
                        min_object_size=10)
    write_roboflow(root / "coco", root / "roboflow")
    yolo_names = write_yolo(root / "coco", root / "yolo")
    write_voc(root / "coco", root / "voc")
    return {"root": root, "yolo_names": yolo_names}


def _boxes_by_image(ds: CocoDetection) -> dict[str, tuple[list, list]]:
    out = {}
    for idx in range(len(ds)):
        info = ds.get_image_info(idx)
        rec = ds._records[idx]
        out[Path(info["file_name"]).name.split("_")[-1]] = (
            sorted(map(tuple, np.round(rec.boxes, 2).tolist())), sorted(ds.class_names[i] for i in rec.labels))
    return out


@pytest.mark.parametrize("layout,kind", [("roboflow", CocoJsonSplit), ("yolo", YoloSplit), ("voc", VocSplit)])
@pytest.mark.parametrize("split", SPLITS)
def test_every_layout_reads_the_same_boxes_and_classes(layouts, layout, kind, split):
    root = layouts["root"]
    coco_split = require_split(root / "coco", split)
    reference = CocoDetection(coco_split.image_dir, coco_split.source, filter_empty=False)
    found = require_split(root / layout, split)
    assert isinstance(found, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fix-up warning: the conversion is clean
        ds = CocoDetection(found.image_dir, found.source, filter_empty=False, read_annotations=found.read)
    expected, got = _boxes_by_image(reference), _boxes_by_image(ds)
    assert set(got) == set(expected)
    for name, (boxes, labels) in expected.items():
        assert got[name][1] == labels, name  # class names, whatever the ids
        np.testing.assert_allclose(got[name][0], boxes, atol=0.01 if layout == "yolo" else 1e-6)
    if layout == "yolo":
        assert list(ds.class_names) == layouts["yolo_names"]  # data.yaml order = label order
    if layout == "voc":
        assert list(ds.class_names) == sorted(set(reference.class_names))
    if layout == "roboflow":
        assert ds.class_names[0] == "shapes-x1y2"  # the project category: kept, never used


def test_voc_difficult_objects_are_ignored_regions(tmp_path, layouts):
    write_voc(layouts["root"] / "coco", tmp_path / "voc", difficult_first=True)
    found = require_split(tmp_path / "voc", "train")
    ds = CocoDetection(found.image_dir, found.source, filter_empty=False, read_annotations=found.read)
    assert ds.stats["crowd_ignored"] == 4  # one per image: kept out of training, ignored by COCOeval
    assert all(a["iscrowd"] in (0, 1) for a in ds.coco.dataset["annotations"])


def test_roboflow_yolo_paths_and_split_aliases(tmp_path, layouts):
    # Roboflow's YOLO export: train/images + train/labels, valid/..., data.yaml with '../train/images'.
    coco = layouts["root"] / "yolo"
    out = tmp_path / "rfyolo"
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(coco / "images" / split, out / folder / "images")
        shutil.copytree(coco / "labels" / split, out / folder / "labels")
    (out / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 6\n"
                                   f"names: {json.dumps(layouts['yolo_names'])}\n")
    found = require_split(out, "val")
    assert isinstance(found, YoloSplit) and found.label_dir == out / "valid" / "labels"
    assert find_split(out, "test") is None


def test_unknown_layout_prints_the_accepted_trees(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        find_split(tmp_path / "stuff", "train")
    for tree in ("instances_SPLIT.json", "_annotations.coco.json", "data.yaml", "JPEGImages", "--train-json"):
        assert tree in str(e.value)
    proc = run_cli("train", "--data", str(tmp_path / "stuff"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no dataset layout recognised" in proc.stderr and "data.yaml" in proc.stderr


def test_yolo_class_id_outside_the_names_is_a_data_error(tmp_path, layouts):
    shutil.copytree(layouts["root"] / "yolo", tmp_path / "y")
    label = sorted((tmp_path / "y" / "labels" / "train").glob("*.txt"))[0]
    label.write_text("9 0.5 0.5 0.2 0.2\n")
    found = require_split(tmp_path / "y", "train")
    with pytest.raises(DataError, match=f"{label.stem}.*class.id 9") as e:  # names the image or its label file
        found.read()
    assert "\n" not in str(e.value)


def test_yolo_without_supervision_says_which_extra(tmp_path, layouts, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "supervision", None)  # import fails as when it is not installed
    with pytest.raises(DataError, match="needs the optional package supervision: pip install 'focus-detr\\[formats\\]'"):
        require_split(layouts["root"] / "yolo", "train").read()


def test_voc_refuses_entity_declarations_and_reads_without_image_sets(tmp_path, layouts):
    shutil.copytree(layouts["root"] / "voc", tmp_path / "voc")
    shutil.rmtree(tmp_path / "voc" / "ImageSets")
    found = require_split(tmp_path / "voc", "train")
    assert isinstance(found, VocSplit) and found.ids is None and len(found.read()["images"]) == 6
    assert find_split(tmp_path / "voc", "val") is None
    xml = sorted((tmp_path / "voc" / "Annotations").glob("*.xml"))[0]
    xml.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xx">]><annotation>&x;</annotation>')
    with pytest.raises(DataError, match=f"{xml.name}: DOCTYPE/ENTITY declarations are not accepted"):
        found.read()


@pytest.mark.parametrize("layout", ["yolo", "voc", "roboflow"])
def test_datasets_of_every_layout_pickle_for_spawned_workers(layouts, layout):
    import pickle

    from focus_detr.engine.data import build_eval_dataset

    found = require_split(layouts["root"] / layout, "val")
    names = CocoDetection(found.image_dir, found.source, read_annotations=found.read).class_names
    ds = build_eval_dataset(found, "val", 64, 100, names)
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy) == len(ds) and copy[0][1]["labels"].tolist() == ds[0][1]["labels"].tolist()
    assert copy.coco.getImgIds() == ds.coco.getImgIds()  # the copy re-reads its labels when it needs them


TRAIN_ARGS = ("--preset", "tiny", "--schedule", "none", "--max-iters", "2", "--batch-size", "2", "--workers", "0",
              "--train-scales", "64", "--lr", "2e-4", "--backbone-lr", "2e-4", "--checkpoint-every", "100",
              "--set", "decoder.num_queries=20", "--set", "encoder.oesm_topk=20", "--set", "test_short_side=64",
              "--no-progress", "--no-tensorboard")


@pytest.mark.parametrize("layout", ["roboflow", "yolo", "voc", "explicit"])
def test_train_and_eval_end_to_end_on_each_layout(layouts, layout, tmp_path, capsys):
    root = layouts["root"]

    def command(*args: str) -> str:
        return ok(run_cli(*args)) if layout == "yolo" else run_here(capsys, *args)

    if layout == "explicit":
        data_args = ["--train-json", str(root / "coco" / "annotations" / "instances_train.json"),
                     "--train-images", str(root / "coco" / "images" / "train"),
                     "--val-json", str(root / "coco" / "annotations" / "instances_val.json"),
                     "--val-images", str(root / "coco" / "images" / "val")]
        eval_args = ["--json", str(root / "coco" / "annotations" / "instances_val.json"),
                     "--images", str(root / "coco" / "images" / "val")]
    else:
        data_args = eval_args = ["--data", str(root / layout)]
    out = command("train", *data_args, "--out", str(tmp_path / "run"), *TRAIN_ARGS)
    assert "done: 2 iterations" in out and "val: AP" in out  # evaluated on the layout's val split
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    names = config["resolved"]["class_names"]
    assert config["model"]["class_names"] == names
    import focus_detr

    assert list(focus_detr.api.load(tmp_path / "run" / "model_final.pth").cfg.class_names) == names  # in the weights
    assert len(names) == (7 if layout == "roboflow" else 6)
    if layout in ("roboflow", "voc"):
        return  # the `eval` command's dataset path is the one training used; checked on the other two
    out = command("eval", str(tmp_path / "run" / "model_final.pth"), *eval_args, "--out", str(tmp_path / "ev"),
                  "--no-progress")
    assert "val: AP" in out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(names)
    final = json.loads((tmp_path / "run" / "eval" / "iter_0000002" / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(final["AP"])  # the same pairing of classes in both
