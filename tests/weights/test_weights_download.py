"""Pretrained names: download from a local server (FOCUS_DETR_MIRROR), resume, cache, verify, one-line errors."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import focus_detr
from focus_detr.weights import registry
from focus_detr.weights.download import DownloadError, cache_home, converted_path, download_path, read_index
from focus_detr.weights.files import CheckpointFormatError
from cli_utils import cli_command
from weights_utils import FIXTURE, FileServer, fixture_official_state_dict, write_registry

TINY_URL_PATH = "/releases/download/v0/tiny_test.zip"


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture()
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return focus_detr.build_model("tiny").eval()


@pytest.fixture()
def env(tmp_path, monkeypatch, server, tiny_model):
    """A cache in tmp, the mirror on the local server, a registry entry ``tiny_test`` served as a release zip."""
    home = tmp_path / "home"
    focus_detr.save(tiny_model, tmp_path / "model_final.pth")
    server.files[TINY_URL_PATH] = _zip_bytes({"tiny_test/model_final.pth": (tmp_path / "model_final.pth").read_bytes(),
                                              "tiny_test/README.md": b"release notes"})
    reg = write_registry(tmp_path / "registry.json", [
        {"name": "tiny_test", "url": "https://example.invalid" + TINY_URL_PATH, "preset": "tiny", "coco_ap": 1.0},
        {"name": "tiny_missing", "url": "https://example.invalid/releases/download/v0/missing.zip", "preset": "tiny"},
    ])
    values = {"FOCUS_DETR_HOME": str(home), "FOCUS_DETR_MIRROR": server.url, "FOCUS_DETR_REGISTRY": str(reg)}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_download_unpack_convert_cache_and_no_network_second_time(env, server, tiny_model):
    model = focus_detr.from_pretrained("tiny_test")
    assert _same_state(model, tiny_model)
    entry = registry.get("tiny_test")
    assert download_path(entry).is_file() and converted_path(entry).is_file()
    index = read_index()["files"]
    assert {"downloads/tiny_test.zip", "converted/tiny_test.pth"} <= set(index)
    assert all(len(v["sha256"]) == 64 for v in index.values())
    assert [r[2] for r in server.requests] == [200]
    server.close()  # a second use must not touch the network
    again = focus_detr.load("tiny_test")
    assert _same_state(again, tiny_model)


def test_interrupted_download_resumes_with_range(env, server, tiny_model):
    server.cut_once.add(TINY_URL_PATH)
    with pytest.raises(DownloadError, match="interrupted.*run the same command again to resume") as info:
        focus_detr.from_pretrained("tiny_test")
    assert "\n" not in str(info.value)
    part = download_path(registry.get("tiny_test")).with_name("tiny_test.zip.part")
    kept = part.stat().st_size
    assert 0 < kept < len(server.files[TINY_URL_PATH])
    model = focus_detr.from_pretrained("tiny_test")
    assert _same_state(model, tiny_model)
    (_, range1, _), (_, range2, status2) = server.requests
    assert range1 is None and range2 == f"bytes={kept}-" and status2 == 206
    assert not part.exists()


def test_tampered_cache_is_refused(env, server):
    focus_detr.from_pretrained("tiny_test")
    converted = converted_path(registry.get("tiny_test"))
    data = bytearray(converted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    converted.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError) as info:
        focus_detr.from_pretrained("tiny_test")
    message = str(info.value)
    assert str(converted) in message and "changed since it was recorded" in message and f"rm {converted}" in message
    assert "\n" not in message
    converted.unlink()  # as the message says: delete it, and the next use rebuilds it from the verified download
    assert focus_detr.from_pretrained("tiny_test") is not None
    download = download_path(registry.get("tiny_test"))
    download.write_bytes(download.read_bytes()[:-10])
    converted_path(registry.get("tiny_test")).unlink()
    with pytest.raises(CheckpointFormatError, match=f"{download}.*changed since it was recorded"):
        focus_detr.from_pretrained("tiny_test")


def test_404_and_refused_connection_are_one_line(env, server, monkeypatch):
    with pytest.raises(DownloadError) as info:
        focus_detr.from_pretrained("tiny_missing")
    message = str(info.value)
    assert f"{server.url}/releases/download/v0/missing.zip" in message and "HTTP 404" in message
    assert str(cache_home() / "downloads" / "missing.zip") in message and "\n" not in message
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FOCUS_DETR_MIRROR", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:\d+/releases.*place it at") as info:
        focus_detr.from_pretrained("tiny_test")
    assert "\n" not in str(info.value)


def test_file_placed_by_hand_is_used_offline(env, server, monkeypatch):
    dest = download_path(registry.get("tiny_test"))
    dest.parent.mkdir(parents=True)
    dest.write_bytes(server.files[TINY_URL_PATH])
    server.close()
    assert focus_detr.from_pretrained("tiny_test") is not None
    assert "downloads/tiny_test.zip" in read_index()["files"]


def test_cli_predict_by_name_and_errors_on_stderr(env, server, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(image)
    run_env = {**os.environ, **env}
    ok = subprocess.run(cli_command() + ["predict", "tiny_test", str(image), "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, env=run_env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "pretrained tiny_test" in ok.stderr and (tmp_path / "out" / "results.json").is_file()
    bad = subprocess.run(cli_command() + ["predict", "tiny_missing", str(image), "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True, env=run_env, timeout=300)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "Traceback" not in bad.stderr
    listing = subprocess.run(cli_command() + ["models"], capture_output=True, text=True, env=run_env, timeout=300)
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith("tiny_test "))
    assert row.rstrip().endswith("yes") and "MiB" in row
    assert "focus_detr_swin_large_384_4scale_22k_36ep" in listing.stdout and "unavailable" in listing.stdout


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_quiet_hides_the_download_bar(env, server, tmp_path, monkeypatch, command):
    """--quiet reaches the download of a pretrained name (the bar shows on a terminal, where tqdm enables it)."""
    from PIL import Image

    from focus_detr.cli.main import main
    from focus_detr.weights import download as download_module

    seen = []
    real = download_module.download
    monkeypatch.setattr(download_module, "download",
                        lambda url, dest, progress=True, desc=None: seen.append(progress) or real(url, dest, progress, desc))
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(image)
    if command == "predict":
        argv = ["predict", "tiny_test", str(image), "--out", str(tmp_path / "out"), "--quiet"]
    else:  # the model is read before the dataset, so a missing dataset still downloads first
        argv = ["eval", "tiny_test", "--data", str(tmp_path / "no_data"), "--quiet"]
    main(argv)
    assert seen == [False]


def test_registry_covers_the_official_readme():
    official = [m for m in registry.MODELS if m.kind == "detector"]
    assert len(official) == 12
    r50 = registry.get("focus_detr_r50_4scale_36ep")
    assert r50.preset == "r50_4scale" and r50.coco_ap == 50.4 and r50.url.endswith("focus_detr_r50_4scale_36ep_v3.zip")
    assert registry.get("focus_detr_r50_4scale_12ep").preset == "r50_4scale_12ep"  # 12 epochs: PE 10000 / -0.5
    assert "_12ep.pth" in registry.get("focus_detr_swin_tiny_224_4scale_36ep").url
    assert not registry.get("focus_detr_swin_large_384_4scale_22k_36ep").available
    with pytest.raises(DownloadError, match="unavailable"):
        focus_detr.from_pretrained("focus_detr_swin_large_384_4scale_22k_36ep")


@pytest.mark.slow
def test_official_zip_from_the_parity_fixture(tmp_path, monkeypatch, server):
    """The R50 36-epoch name, served as a release zip of the fixture's rule-built official checkpoint: downloaded,
    unpacked, converted, cached, and giving the fixture's foreground logits."""
    torch.set_num_threads(2)
    official = fixture_official_state_dict(FIXTURE)
    entry = registry.get("focus_detr_r50_4scale_36ep")
    path = "/" + entry.url.split("/", 3)[3]
    server.files[path] = _zip_bytes({"focus_detr_r50_4scale_36ep/model_final.pth": _torch_bytes({"model": official})})
    monkeypatch.setenv("FOCUS_DETR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FOCUS_DETR_MIRROR", server.url)
    overrides = {"batch_mode": "official", "denoising.num_queries": 0}
    model = focus_detr.from_pretrained(entry.name, **overrides)
    direct = focus_detr.load_official(official, "r50_4scale", **overrides)
    del official
    assert _same_state(model, direct)
    del direct
    import numpy as np
    from PIL import Image

    import json

    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    images = [torch.from_numpy(np.asarray(Image.open(FIXTURE / item["file"]).convert("RGB")).copy()).permute(2, 0, 1)
              for item in manifest["inputs"]]
    with torch.no_grad():
        out = model(model.batch(images))
    with np.load(FIXTURE / "expected.npz") as expected:
        fg = expected["eval_fg_score"]
    np.testing.assert_allclose(out.foreground_logits[..., None].numpy(), fg, atol=1e-5, rtol=0)


def test_backbone_weights_by_name_and_imagenet(env, server, tmp_path, monkeypatch):
    from focus_detr.backbones import ResNet, load_backbone_weights
    from focus_detr.weights.registry import backbone_entry_for
    from test_backbones import SHORT, random_torchvision_r50

    assert backbone_entry_for(focus_detr.config.get_preset("r50_4scale").backbone).name == "resnet50_imagenet"
    assert backbone_entry_for(focus_detr.config.get_preset("r101_4scale_12ep").backbone).name == "resnet101_imagenet"
    swin_b = focus_detr.config.get_preset("swin_base_384_4scale").backbone
    assert backbone_entry_for(swin_b).name == "swin_base_384_imagenet22k"
    with pytest.raises(CheckpointFormatError, match="imagenet: no ImageNet weights are published"):
        load_backbone_weights(focus_detr.build_model("tiny").backbone, "imagenet")
    # A site registry replaces the torchvision URL; the file comes from the local server, by name.
    server.files["/models/resnet50-0676ba61.pth"] = _torch_bytes(random_torchvision_r50(SHORT))
    reg = write_registry(tmp_path / "backbones.json", [
        {"name": "resnet50_imagenet", "url": "https://example.invalid/models/resnet50-0676ba61.pth", "preset": None,
         "kind": "backbone", "backbone": "R-50"}])
    monkeypatch.setenv("FOCUS_DETR_REGISTRY", str(reg))
    report = load_backbone_weights(ResNet(num_blocks=SHORT), "resnet50_imagenet")
    assert report.source == "torchvision ResNet" and report.loaded and not report.missing
    with pytest.raises(CheckpointFormatError, match="not a backbone name"):
        load_backbone_weights(ResNet(num_blocks=SHORT), "resnet51_imagenet")
