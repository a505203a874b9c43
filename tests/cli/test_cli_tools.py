"""`focus-detr convert`, `focus-detr info` and every command's `--help` (real console script, CPU, tiny preset)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import focus_detr
from focus_detr.cli.main import COMMANDS, main
from cli_utils import run_cli
from weights_utils import official_checkpoint

MY_COMMANDS = ["predict", "explain", "convert", "info", "export"]


# --------------------------------------------------------------------------------------------------
# A tiny model written under the official detrex key names (the inverse of convert/official.py's table),
# so the converter is exercised on the layout real checkpoints have: detectron2 dict with "model", alias
# keys (decoder / encoder copies of the heads), official module names.

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny")
    torch.save(official_checkpoint(model), root / "official_tiny.pth")
    focus_detr.save(model, root / "ours.pt")
    (root / "text.pth").write_text("not a checkpoint")
    return {"root": root, "official": root / "official_tiny.pth", "ours": root / "ours.pt", "text": root / "text.pth"}


def test_official_helper_is_the_inverse_of_the_converter(files: dict[str, Path]) -> None:
    model, report = focus_detr.load_official(files["official"], "tiny", return_report=True)
    ours = focus_detr.load(files["ours"])
    assert not report.unconverted and len(report.aliases) > 0
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------------
# convert


def test_convert_end_to_end(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "converted.pt"
    proc = run_cli("convert", files["official"], out, "--preset", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+ keys converted, \d+ alias keys dropped, 0 ignored, 0 unconverted", proc.stdout)
    assert "outputs identical" in proc.stdout
    converted = focus_detr.load(out)
    reference = focus_detr.load(files["ours"])
    for key, value in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    assert converted.cfg == reference.cfg
    extra = focus_detr.read_weights_file(out)["extra"]
    assert extra["preset"] == "tiny" and extra["converted_from"] == "official_tiny.pth"
    # Refuses to overwrite without --force.
    again = run_cli("convert", files["official"], out, "--preset", "tiny", "--no-verify")
    assert again.returncode == 2 and "--force" in again.stderr


def test_convert_wrong_preset_names_the_problem(files: dict[str, Path], tmp_path: Path) -> None:
    # Same key names, other widths: every mis-shaped key is listed, and nothing is written.
    proc = run_cli("convert", files["official"], tmp_path / "x.pt", "--preset", "r50_4scale")
    assert proc.returncode == 1
    assert "does not fit the model" in proc.stderr and "mis-shaped keys" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.pt").exists()
    proc = run_cli("convert", files["text"], tmp_path / "y.pt", "--preset", "tiny")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# info


def test_info_preset_counts_parameters() -> None:
    proc = run_cli("info", "tiny")
    assert proc.returncode == 0, proc.stderr
    total = sum(p.numel() for p in focus_detr.build_model("tiny").parameters())
    assert f"parameters: {total:,}" in proc.stdout
    assert "encoder:" in proc.stdout and "cascade: [1.0, 0.6]" in proc.stdout


def test_info_weights_file_json(files: dict[str, Path]) -> None:
    proc = run_cli("info", files["ours"], "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "weights" and info["config"]["embed_dim"] == 64
    params = info["parameters"]
    model = focus_detr.load(files["ours"])
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["encoder"] == sum(p.numel() for p in model.encoder.parameters())
    assert params["tensors_in_file"] == len(model.state_dict())


def test_info_official_checkpoint_shows_key_sources(files: dict[str, Path]) -> None:
    proc = run_cli("info", files["official"], "--preset", "tiny", "--json", "--keys")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kind"] == "official" and info["unconverted"] == []
    assert info["sources"]["encoder"] == {"transformer.encoder.*": 44}
    assert info["sources"]["proposal_class_head"] == {"class_embed.2.*": 2}
    assert info["key_map"]["transformer.level_embeds"] == "level_embed"
    # decoder copies of 3 class heads (2 tensors each) and 3 box heads (6 each), 2 x 2 encoder copies (2 each)
    assert info["aliases"] == 3 * 2 + 3 * 6 + 2 * 2 * 2
    text = run_cli("info", files["official"], "--preset", "tiny")
    assert "foreground_selector" in text.stdout and "transformer.enc_mask_predictor.*" in text.stdout
    bare = run_cli("info", files["official"])  # no preset: key summary and a hint
    assert bare.returncode == 0 and "pass --preset" in bare.stdout


def test_info_errors(files: dict[str, Path]) -> None:
    proc = run_cli("info", "no_such_preset_or_file")
    assert proc.returncode == 2 and "neither a file nor a preset" in proc.stderr
    proc = run_cli("info", files["text"])
    assert proc.returncode == 1 and "text.pth" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# --help


def test_top_level_help_lists_every_command() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name.replace("_", "-") in proc.stdout


@pytest.mark.parametrize("command", MY_COMMANDS)
def test_command_help_has_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: focus-detr {command}" in text
    assert "examples:" in text and f"focus-detr {command} " in text.split("examples:")[1]


def test_command_help_through_the_console_script() -> None:
    proc = run_cli("export", "--help")
    assert proc.returncode == 0 and "onnxruntime" in proc.stdout
