"""Tests of the synthetic "shapes" dataset: determinism, caching, statistics, COCO validity."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from focus_detr.data import SHAPES_CLASS_NAMES, CocoDetection, ensure_shapes_dataset, make_shapes_dataset
from focus_detr.data.synthetic import MANIFEST_NAME


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = make_shapes_dataset(tmp_path / "a", num_train=6, num_val=3, seed=5)
    b = make_shapes_dataset(tmp_path / "b", num_train=6, num_val=3, seed=5)
    fa, fb = _all_files(a.root), _all_files(b.root)
    assert len(fa) == 6 + 3 + 2 + 1  # images, two annotation files, manifest
    assert fa == fb
    c = make_shapes_dataset(tmp_path / "c", num_train=6, num_val=3, seed=6)
    fc = _all_files(c.root)
    assert fc["images/train/000001.jpg"] != fa["images/train/000001.jpg"]
    # Each image depends only on (seed, split, index): a bigger dataset starts with the same images.
    d = make_shapes_dataset(tmp_path / "d", num_train=8, num_val=0, seed=5)
    assert _all_files(d.root)["images/train/000006.jpg"] == fa["images/train/000006.jpg"]


def test_ensure_generates_only_when_needed(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    first = ensure_shapes_dataset(root, num_train=4, num_val=2, seed=1, image_format="png")
    assert first.generated and first.seconds > 0
    again = ensure_shapes_dataset(root, num_train=4, num_val=2, seed=1, image_format="png")
    assert not again.generated and again.num_train_boxes == first.num_train_boxes
    # Other parameters: regenerated, and the old images are gone.
    other = ensure_shapes_dataset(root, num_train=3, num_val=2, seed=1, image_format="png")
    assert other.generated and sorted(p.name for p in other.train_image_dir.iterdir()) == [
        "000001.png", "000002.png", "000003.png"]
    # An incomplete copy (missing image, or no manifest because generation was interrupted) is regenerated.
    (other.train_image_dir / "000003.png").unlink()
    assert ensure_shapes_dataset(root, num_train=3, num_val=2, seed=1, image_format="png").generated
    (root / MANIFEST_NAME).unlink()
    assert ensure_shapes_dataset(root, num_train=3, num_val=2, seed=1, image_format="png").generated
    summary = other.as_dict()
    assert summary["class_names"] == list(SHAPES_CLASS_NAMES) and summary["root"] == str(root)
    json.dumps(summary)  # CLI-friendly


def test_statistics_and_coco_validity(tmp_path: Path) -> None:
    h, w = 192, 256
    info = make_shapes_dataset(tmp_path, num_train=120, num_val=10, seed=0, image_size=(h, w))
    data = json.loads(info.train_annotations.read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASS_NAMES)
    anns = data["annotations"]
    assert len(anns) == info.num_train_boxes

    per_class = Counter(a["category_id"] for a in anns)
    assert set(per_class) == set(range(1, len(SHAPES_CLASS_NAMES) + 1))
    assert min(per_class.values()) > 0.5 * len(anns) / len(SHAPES_CLASS_NAMES)  # roughly balanced

    per_image = Counter(a["image_id"] for a in anns)
    assert set(per_image) == set(range(1, 121))  # every image has at least one object
    assert max(per_image.values()) <= 6
    assert 2.5 < len(anns) / 120 < 4.5

    sizes = np.array([math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in anns])
    assert sizes.min() < 20 and sizes.max() > 0.4 * min(h, w)  # small .. large
    small = (np.array([a["area"] for a in anns]) < 32 ** 2).mean()
    assert 0.1 < small < 0.5  # COCO-style "small" objects present but not dominant
    for a in anns:
        x, y, bw, bh = a["bbox"]
        assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        assert a["area"] == bw * bh and a["iscrowd"] == 0

    # The reader accepts it as is: no fix-up, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(info.train_image_dir, info.train_annotations)
        image, target = ds[0]
    assert ds.class_names == SHAPES_CLASS_NAMES and len(ds) == 120
    assert all(v == 0 for v in ds.fixups.values())
    assert image.shape == (3, h, w)


def test_objects_are_visible_where_annotated(tmp_path: Path) -> None:
    # Objects are saturated and the background / distractors are not: inside each box there must be
    # strongly coloured pixels (checks that boxes sit on the drawn objects, not somewhere else).
    from PIL import Image

    info = make_shapes_dataset(tmp_path, num_train=10, num_val=0, seed=3, image_format="png")
    data = json.loads(info.train_annotations.read_text())
    for a in data["annotations"]:
        img = np.asarray(Image.open(info.train_image_dir / f"{a['image_id']:06d}.png").convert("HSV"))
        x, y, bw, bh = (int(v) for v in a["bbox"])
        patch = img[y:y + bh, x:x + bw]
        saturated = (patch[..., 1] > 110).mean()
        assert saturated > 0.25, (a, saturated)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=(16, 64)), "at least 32"),
    (dict(objects_per_image=(0, 3)), "objects_per_image"),
    (dict(min_object_size=200), "min_object_size"),
    (dict(image_format="gif"), "image_format"),
    (dict(class_colour_prob=1.5), "class_colour_prob"),
])
def test_parameter_validation(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_shapes_dataset(tmp_path, num_train=1, num_val=1, **kwargs)


# ---- the clutter option and the crowded-shapes layout ----------------------------------------------------


def test_default_images_unchanged_by_the_clutter_option() -> None:
    # Pixel hashes and boxes of three images from the generator as it was before `clutter` existed (demo
    # parameters, seed 0): the demo's dataset must stay exactly the same.
    import hashlib

    from focus_detr.data.synthetic import _make_params, render_shapes_image

    p = _make_params(1, 0, 0, (192, 256), (1, 6), 12, 0.6, 0.2, 0.85, 0.6, "png", 92)
    expected = {1: ("23fdb0188b2d1c03", [(3, (150, 96, 220, 155)), (0, (188, 72, 218, 110)), (3, (4, 39, 121, 143)),
                                         (1, (92, 108, 108, 122)), (3, (202, 121, 214, 133)), (2, (94, 38, 149, 99))]),
                2: ("b4a1e62796a734d9", [(5, (157, 104, 195, 145)), (4, (52, 72, 160, 162))]),
                3: ("6e87e8933d59ff2c", [(5, (84, 72, 138, 130)), (0, (133, 135, 163, 168)), (2, (76, 19, 92, 39)),
                                         (3, (160, 25, 187, 50))])}
    for i, (digest, boxes) in expected.items():
        pixels, objects, _ = render_shapes_image(np.random.default_rng([0, 0, i]), p)
        assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == digest
        assert [(label, box) for label, box, _ in objects] == boxes


def test_manifest_of_default_clutter_matches_older_copies(tmp_path: Path) -> None:
    # The default clutter is not written into the manifest, so copies made before the option are reused.
    info = make_shapes_dataset(tmp_path / "d", num_train=2, num_val=1, seed=4)
    manifest = json.loads((info.root / MANIFEST_NAME).read_text())
    assert "clutter" not in manifest["params"]
    assert not ensure_shapes_dataset(tmp_path / "d", num_train=2, num_val=1, seed=4, clutter=1.0).generated
    more = ensure_shapes_dataset(tmp_path / "d", num_train=2, num_val=1, seed=4, clutter=2.0)
    assert more.generated and json.loads((info.root / MANIFEST_NAME).read_text())["params"]["clutter"] == 2.0


def test_crowded_layout_has_many_small_and_medium_objects(tmp_path: Path) -> None:
    from focus_detr.data import SHAPES_LAYOUTS

    layout = SHAPES_LAYOUTS["crowded-shapes"]
    assert SHAPES_LAYOUTS["shapes"].as_kwargs() == dict(image_size=(192, 256), objects_per_image=(1, 6),
                                                        min_object_size=12, max_object_fraction=0.6,
                                                        small_fraction=0.2, clutter=1.0)
    info = make_shapes_dataset(tmp_path / "c", num_train=12, num_val=0, seed=0, **layout.as_kwargs())
    again = make_shapes_dataset(tmp_path / "c2", num_train=12, num_val=0, seed=0, **layout.as_kwargs())
    assert _all_files(info.root) == _all_files(again.root)  # deterministic
    anns = json.loads(info.train_annotations.read_text())["annotations"]
    h, w = layout.image_size
    assert (h, w) == (384, 512) and len(anns) / 12 > 12  # crowded: 8-24 attempted, most placed
    side = np.sqrt([a["area"] for a in anns])
    small, medium = (side < 32).mean(), ((side >= 32) & (side < 96)).mean()
    assert small > 0.3 and medium > 0.3 and small + medium > 0.85
    # Most of the image is background: the object boxes add up to well under half of it (about a third).
    assert sum(a["area"] for a in anns) / (12 * h * w) < 0.45


def test_clutter_validation(tmp_path: Path) -> None:
    for bad in (0.5, 11.0, float("nan")):
        with pytest.raises(ValueError, match="clutter"):
            make_shapes_dataset(tmp_path, num_train=1, num_val=0, clutter=bad)
