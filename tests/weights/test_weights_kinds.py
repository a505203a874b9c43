"""Every kind of weights source through every command that takes weights, and through ``focus_detr.load``.

Kinds: our weights file, training checkpoint (raw and ``--ema``), official detrex checkpoint (``--preset``),
release zip, Hugging Face folder, pretrained name (served by a local HTTP server). Commands: predict,
explain, info, export, eval, ``train --init-weights``. Each pair is accepted and gives the same weights, or is
refused with one line naming the file and why. The commands run in-process through ``focus_detr.cli.main``
(the console script's entry point) to keep the table fast; a few rows also run through the console script.
``export`` runs with the ONNX step replaced by a recorder (test_onnx covers the export itself, which takes
minutes): what is checked here is that its WEIGHTS argument loads the same model as every other command.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import focus_detr
from focus_detr.cli.main import main
from focus_detr.config import COCO_CLASS_NAMES, config_to_dict
from focus_detr.engine.checkpoint import save_checkpoint
from focus_detr.weights.kinds import identify
from cli_utils import cli_command
from weights_utils import FileServer, official_from_ours, write_registry

KINDS = ["weights", "checkpoint", "checkpoint_ema", "official", "zip", "hf", "registry"]
KIND_OF = {"checkpoint_ema": "checkpoint"}  # what `info` / identify call each row
FLAGS = {"checkpoint_ema": ["--ema"], "official": ["--preset", "tiny"], "zip": ["--preset", "tiny"]}


def _tiny(seed: int) -> focus_detr.FocusDETR:
    torch.manual_seed(seed)
    return focus_detr.build_model("tiny").eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    model, ema = _tiny(0), _tiny(1)
    sources = {"weights": focus_detr.save(model, root / "weights.pth")}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema_sd = {f"module.{k}": v.clone() for k, v in ema.state_dict().items()}
    ema_sd["n_averaged"] = torch.tensor(3)
    ckpt = save_checkpoint(root / "checkpoint_0000003.pth", {"iteration": 3, "model_config": config_to_dict(model.cfg),
                                                               "model": sd, "ema": ema_sd})
    sources["checkpoint"] = sources["checkpoint_ema"] = ckpt
    sources["official"] = root / "official_tiny.pth"
    torch.save({"model": official_from_ours(model), "iteration": 90000}, sources["official"])
    sources["zip"] = root / "focus_detr_tiny.zip"
    with zipfile.ZipFile(sources["zip"], "w") as z:
        z.write(sources["official"], "focus_detr_tiny/model_final.pth")
        z.writestr("focus_detr_tiny/log.txt", "training log")
    sources["hf"] = model.save_pretrained(root / "hf")
    # The pretrained name: a release zip of our weights file on a local server.
    server = FileServer()
    with zipfile.ZipFile(root / "served.zip", "w") as z:
        z.write(sources["weights"], "tiny_pretrained/model_final.pth")
    server.files["/rel/tiny_pretrained.zip"] = (root / "served.zip").read_bytes()
    registry_file = write_registry(root / "registry.json", [
        {"name": "tiny_pretrained", "url": "https://example.invalid/rel/tiny_pretrained.zip", "preset": "tiny"}])
    env = {"FOCUS_DETR_HOME": str(root / "home"), "FOCUS_DETR_MIRROR": server.url,
           "FOCUS_DETR_REGISTRY": str(registry_file)}
    sources["registry"] = "tiny_pretrained"
    # Images and a COCO dataset with the model's (COCO) classes.
    from PIL import Image

    data = root / "data"
    for split in ("train", "val"):
        (data / "images" / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(2):
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(data / "images" / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": 80, "height": 64})
            annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 30, 20],
                                "area": 600, "iscrowd": 0})
        (data / "annotations").mkdir(exist_ok=True)
        (data / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(COCO_CLASS_NAMES)]}))
    expected = {"weights": model, "checkpoint": model, "checkpoint_ema": ema, "official": model, "zip": model,
                "hf": model, "registry": model}
    yield {"root": root, "sources": {k: str(v) for k, v in sources.items()}, "env": env, "data": data,
           "image": data / "images" / "val" / "0.png", "expected": expected}
    server.close()


@pytest.fixture()
def env(world, monkeypatch):
    for k, v in world["env"].items():
        monkeypatch.setenv(k, v)
    return world


def _same(a: focus_detr.FocusDETR, b: focus_detr.FocusDETR) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
def test_focus_detr_load(kind, env):
    flags = FLAGS.get(kind, [])
    model = focus_detr.load(env["sources"][kind], preset="tiny" if "--preset" in flags else None, ema="--ema" in flags)
    assert _same(model, env["expected"][kind])
    assert identify(env["sources"][kind]).kind == KIND_OF.get(kind, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_and_explain(kind, env, tmp_path, capsys):
    source, flags = env["sources"][kind], FLAGS.get(kind, [])
    assert main(["predict", source, str(env["image"]), "--out", str(tmp_path / "p"), "--device", "cpu", *flags]) == 0
    assert json.loads((tmp_path / "p" / "images.json").read_text())["images"]
    assert main(["explain", source, str(env["image"]), "--out", str(tmp_path / "e"), "--device", "cpu", "--width", "4",
                 "--dpi", "40", *flags]) == 0
    assert (tmp_path / "e" / "explain.png").is_file()
    err = capsys.readouterr().err
    assert "model: " in err


@pytest.mark.parametrize("kind", KINDS)
def test_info_names_the_kind(kind, env, capsys):
    assert main(["info", env["sources"][kind], "--json", *FLAGS.get(kind, [])]) == 0
    info = json.loads(capsys.readouterr().out)
    expected_kind = {"registry": "registry"}.get(kind, KIND_OF.get(kind, kind))
    assert info["kind"] == expected_kind
    assert info["config"]["embed_dim"] == 64
    if kind == "checkpoint_ema":
        assert info["weights"] == "EMA"
    if kind == "zip":
        assert info["member"] == "focus_detr_tiny/model_final.pth" and info["inner_kind"] == "official"


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_every_kind(kind, env, tmp_path, monkeypatch):
    import focus_detr.export.onnx as onnx_export

    seen = {}

    class Report:
        path, size_bytes, opset, seconds, checks = tmp_path / "m.onnx", 0, 18, 0.0, []

    def record(model, out, **kwargs):
        seen["model"] = model
        return Report()

    monkeypatch.setattr(onnx_export, "export_onnx", record)
    code = main(["export", env["sources"][kind], "--format", "onnx", str(tmp_path / "m.onnx"), "--no-verify",
                 "--device", "cpu", *FLAGS.get(kind, [])])
    assert code == 0 and _same(seen["model"].cpu(), env["expected"][kind])


@pytest.mark.parametrize("kind", KINDS)
def test_eval(kind, env, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", env["sources"][kind], "--data", str(env["data"]), "--out", str(out), "--device", "cpu",
                 "--no-progress", *FLAGS.get(kind, [])])
    assert code == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "checkpoint_ema"])  # train has no --ema for init
def test_train_init_weights(kind, env, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(env["data"]), "--out", str(run), "--init-weights",
                 env["sources"][kind], "--schedule", "none", "--max-iters", "1", "--batch-size", "1", "--workers", "0",
                 "--val-split", "none", "--train-scales", "64", "--no-progress", "--no-tensorboard", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"initial weights from {env['sources'][kind]}:" in out
    loaded = int(out.split(f"initial weights from {env['sources'][kind]}: ")[1].split(" tensors loaded")[0])
    assert loaded == len(env["expected"][kind].state_dict())


REFUSED = [
    # (kind, extra flags, phrase naming why)
    ("weights", ["--ema"], "--ema applies to training checkpoints"),
    ("official", [], "pass --preset"),
    ("official", ["--preset", "r50_4scale"], "does not fit the model"),
    ("hf", ["--ema"], "--ema applies to training checkpoints"),
]


@pytest.mark.parametrize("kind,flags,phrase", REFUSED)
def test_refusals_are_one_line_naming_the_file(kind, flags, phrase, env, tmp_path, capsys):
    source = env["sources"][kind]
    code = main(["predict", source, str(env["image"]), "--out", str(tmp_path / "p"), "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert source in err and phrase in err


def test_zip_with_none_or_several_checkpoints_is_refused(env, tmp_path):
    empty, several = tmp_path / "empty.zip", tmp_path / "several.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("notes/README.md", "nothing here")
    with zipfile.ZipFile(several, "w") as z:
        z.write(env["sources"]["weights"], "a/model_final.pth")
        z.write(env["sources"]["weights"], "a/model_0089999.pth")
    with pytest.raises(focus_detr.CheckpointFormatError, match=r"holds no checkpoint file \(contents: notes/README.md"):
        focus_detr.load(empty)
    with pytest.raises(focus_detr.CheckpointFormatError, match="2 candidate checkpoint files.*model_0089999.pth"):
        focus_detr.load(several)


def test_console_script_rows(env, tmp_path):
    run_env = {**os.environ, **env["env"], "OMP_NUM_THREADS": "1"}
    for kind in ("checkpoint", "registry"):
        proc = subprocess.run(cli_command() + ["predict", env["sources"][kind], str(env["image"]), "--out",
                                               str(tmp_path / kind)], capture_output=True, text=True, env=run_env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(cli_command() + ["info", env["sources"]["zip"]], capture_output=True, text=True,
                          env=run_env, timeout=300)
    assert proc.returncode == 1 and "pass --preset" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
