"""The Hugging Face layout: save_pretrained / from_pretrained round trip, tamper detection, and clear errors when
the optional huggingface_hub package is missing (no network is used)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import focus_detr
from focus_detr.weights.files import CheckpointFormatError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return focus_detr.build_model("tiny").eval()


def test_round_trip_is_exact(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "hf", extra={"trained_on": "shapes"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((folder / "config.json").read_text())
    assert document["model_type"] == "focus-detr" and document["config"]["embed_dim"] == 64
    loaded = focus_detr.from_pretrained(folder, num_detections=10)
    assert loaded.cfg.num_detections == 10 and loaded.cfg.class_names == tiny.cfg.class_names
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        a, b = tiny(tiny.batch([image])), loaded(loaded.batch([image]))
    torch.testing.assert_close(a.main.logits, b.main.logits, rtol=0, atol=0)


def test_edited_or_damaged_folder_is_refused(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "hf")
    config = folder / "config.json"
    original = config.read_text()
    document = json.loads(original)
    document["config"]["num_detections"] = 5
    config.write_text(json.dumps(document))
    with pytest.raises(CheckpointFormatError, match="checksum mismatch between config.json and model.safetensors"):
        focus_detr.from_pretrained(folder)
    config.write_text(original)
    tensors = folder / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(CheckpointFormatError, match="model.safetensors: not a readable safetensors file"):
        focus_detr.from_pretrained(folder)
    config.write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="config.json: not a readable JSON config"):
        focus_detr.from_pretrained(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="not a Hugging Face model folder \\(no model.safetensors\\)"):
        focus_detr.from_pretrained(tmp_path / "other")


def test_without_huggingface_hub_the_error_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointFormatError, match=r"pip install 'focus-detr\[hub\]'"):
        tiny.push_to_hub("someone/focus-detr-tiny")
    with pytest.raises(CheckpointFormatError, match=r"someone/focus-detr-tiny: .*Hub repo id.*focus-detr\[hub\]"):
        focus_detr.from_pretrained("someone/focus-detr-tiny")
