"""Crafted, damaged and malicious model files (issue #13 item 2): one line on stderr naming the file, no
traceback, non-zero exit, nothing built from an out-of-bounds config, and never torch's advice to load
unsafely."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import focus_detr
from focus_detr.cli.main import main
from focus_detr.config import config_to_dict
from focus_detr.weights.files import (CheckpointFormatError, atomic_torch_save, remove_orphaned_temporaries,
                                      temporary_name, tree_digest)
from focus_detr.weights.kinds import weights_digest, weights_payload
from focus_detr.weights.validate import check_config_dict
from cli_utils import cli_command


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return focus_detr.build_model("tiny").eval()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.full((48, 64, 3), 100, np.uint8)).save(path)
    return path


def _resigned(payload: dict) -> dict:
    """The payload with a checksum recomputed over its (crafted) content, as an attacker would."""
    payload = dict(payload)
    payload["sha256"] = weights_digest(payload["config"], payload["state_dict"], payload.get("extra", {}),
                                       payload["format_version"])
    return payload


def _crafted_files(tiny, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    good = weights_payload(tiny)
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, obj, phrase: str) -> None:
        path = root / f"{name}.pth"
        torch.save(obj, path)
        files[name] = (path, phrase)

    put("config_string", {**good, "config": "embed_dim=64"}, "the model config must be a mapping")
    put("state_dict_missing", {k: v for k, v in good.items() if k != "state_dict"}, "has no state_dict")
    put("state_dict_list", {**good, "state_dict": [1, 2]}, "state_dict must be a mapping")
    put("format_version_string", {**good, "format_version": "2"}, "format_version must be an integer")
    huge = dict(good["config"], embed_dim=10**7)
    put("embed_dim_huge", _resigned({**good, "config": huge}), "embed_dim = 10000000 is outside")
    layers = dict(good["config"], decoder=dict(good["config"]["decoder"], num_layers=60, ffn_dim=60000))
    put("config_too_big_for_file", _resigned({**good, "config": layers}), "the config does not belong")
    put("wrong_checksum", {**good, "extra": {"note": "edited"}}, "checksum mismatch")
    evil = root / "evil.pth"
    torch.save({"model": {"x": _Evil(str(root / "pwned"))}}, evil)
    files["malicious_pth"] = (evil, "refused")
    cut = root / "cut.pth"
    data = (root / "config_string.pth").read_bytes()
    torch.save(good, cut)
    cut.write_bytes(cut.read_bytes()[: len(data) // 3])
    files["truncated_pth"] = (cut, "truncated")
    return files


@pytest.fixture(scope="module")
def crafted(tiny, tmp_path_factory):
    return _crafted_files(tiny, tmp_path_factory.mktemp("crafted"))


CASES = ["config_string", "state_dict_missing", "state_dict_list", "format_version_string", "embed_dim_huge",
         "config_too_big_for_file", "wrong_checksum", "malicious_pth", "truncated_pth"]


@pytest.mark.parametrize("case", CASES)
def test_crafted_weights_are_refused_in_one_line(case, crafted, image, tmp_path, capsys):
    path, phrase = crafted[case]
    code = main(["predict", str(path), str(image), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and phrase in err, err
    assert "weights_only" not in err and "Traceback" not in err
    assert not (path.parent / "pwned").exists()
    with pytest.raises(CheckpointFormatError, match=phrase):
        focus_detr.load(path)


def test_crafted_weights_through_the_console_script(crafted, image, tmp_path):
    for case in ("embed_dim_huge", "malicious_pth"):
        path, phrase = crafted[case]
        proc = subprocess.run(cli_command() + ["predict", str(path), str(image), "--out", str(tmp_path / case)],
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and phrase in lines[0] and str(path) in lines[0], proc.stderr
        assert "weights_only" not in proc.stderr


def test_backbone_weight_files_fail_in_one_line(tmp_path):
    from focus_detr.backbones import ResNet, load_backbone_weights

    sentinel = tmp_path / "pwned"
    cases = {}
    cases["evil.pkl"] = pickle.dumps({"model": {"stem.conv1.weight": _Evil(str(sentinel))}})
    buf = io.BytesIO()
    torch.save({"model": {"conv1.weight": _Evil(str(sentinel))}}, buf)
    cases["evil.pth"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, buf)
    cases["cut.pth"] = buf.getvalue()[:200]
    cases["garbage.pkl"] = os.urandom(300)
    cases["text.pkl"] = b"hello, not a pickle"
    backbone = ResNet(num_blocks=(1, 1, 1, 1))
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointFormatError) as info:
            load_backbone_weights(backbone, path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, message
        assert "weights_only" not in message
    assert not sentinel.exists()


def test_config_bounds_table():
    ok = config_to_dict(focus_detr.build_model("tiny").cfg)
    check_config_dict(ok)
    for field, value, phrase in [
        ("embed_dim", 10**7, "outside"), ("embed_dim", "64", "must be an integer"), ("num_classes", True, "number"),
        ("num_detections", 1.5, "integer"), ("class_names", [1, 2], "strings"), ("test_short_side", -5, "outside"),
        ("pixel_mean", "abc", "list"), ("batch_mode", 3, "string"), ("surprise", 1, "unknown config field"),
    ]:
        with pytest.raises(ValueError, match=phrase):
            check_config_dict({**ok, field: value})
    with pytest.raises(ValueError, match="decoder.num_queries"):
        check_config_dict({**ok, "decoder": {**ok["decoder"], "num_queries": 10**6}})
    with pytest.raises(ValueError, match="backbone.type"):
        check_config_dict({**ok, "backbone": {**ok["backbone"], "type": "vit"}})
    with pytest.raises(ValueError, match="encoder.cascade"):
        check_config_dict({**ok, "encoder": {**ok["encoder"], "cascade": [float("nan")] * 2}})


def test_checksum_covers_config_and_tensors(tiny, tmp_path):
    path = focus_detr.save(tiny, tmp_path / "w.pth")
    payload = torch.load(path, weights_only=True)
    payload["config"]["num_detections"] = 7  # a config edit without re-signing
    torch.save(payload, tmp_path / "edited.pth")
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        focus_detr.load(tmp_path / "edited.pth")
    assert tree_digest({"a": (1, 2)}) != tree_digest({"a": [1, 2]})


def test_atomic_writer_temporaries_are_unique_and_orphans_removed(tmp_path):
    target = tmp_path / "model.pth"
    names = {temporary_name(target).name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(f".model.pth.tmp-{os.getpid()}-") for n in names)
    atomic_torch_save({"x": torch.ones(2)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    dead_pid = subprocess.Popen(["true"])  # a finished child: its PID runs nothing any more
    dead_pid.wait()
    orphan = tmp_path / f".model.pth.tmp-{dead_pid.pid}-abcd1234"
    legacy = tmp_path / f".checkpoint_0000001.pth.tmp-{dead_pid.pid}"
    mine = temporary_name(target)
    for p in (orphan, legacy, mine):
        p.write_bytes(b"partial")
    removed = remove_orphaned_temporaries(tmp_path)
    assert sorted(removed) == sorted([orphan, legacy])
    assert mine.exists() and target.exists()
    old = os.stat(mine)
    os.utime(mine, (old.st_atime - 3 * 86400, old.st_mtime - 3 * 86400))
    assert remove_orphaned_temporaries(tmp_path) == [mine]
