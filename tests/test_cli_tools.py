"""`focus-detr convert`, `focus-detr info` and every command's `--help` (real console script, CPU, tiny preset)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import focus_detr
from focus_detr.cli.main import COMMANDS, main
from test_cli_predict import run_cli

MY_COMMANDS = ["predict", "explain", "convert", "info", "export"]


# --------------------------------------------------------------------------------------------------
# A tiny model written under the official detrex key names (the inverse of convert/official.py's table),
# so the converter is exercised on the layout real checkpoints have: detectron2 dict with "model", alias
# keys (decoder / encoder copies of the heads), official module names.

_OURS_TO_OFFICIAL = [
    (r"^level_embed$", "transformer.level_embeds"),
    (r"^foreground_selector\.alpha$", "transformer.alpha"),
    (r"^target_embed\.weight$", "transformer.tgt_embed.weight"),
    (r"^token_proj\.(.*)$", r"transformer.enc_output.\1"),
    (r"^token_proj_norm\.(.*)$", r"transformer.enc_output_norm.\1"),
    (r"^foreground_selector\.score_net\.norm\.(.*)$", r"transformer.enc_mask_predictor.layer1.0.\1"),
    (r"^foreground_selector\.score_net\.proj\.(.*)$", r"transformer.enc_mask_predictor.layer1.1.\1"),
    (r"^foreground_selector\.score_net\.head\.(\d)\.(.*)$", r"transformer.enc_mask_predictor.layer2.\1.\2"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.linear1\.(.*)$", r"transformer.\1.layers.\2.ffns.0.layers.0.0.\3"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.linear2\.(.*)$", r"transformer.\1.layers.\2.ffns.0.layers.1.\3"),
    (r"^decoder\.layers\.(\d+)\.self_attn\.(.*)$", r"transformer.decoder.layers.\1.attentions.0.attn.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.(.*)$", r"transformer.decoder.layers.\1.attentions.1.\2"),
    (r"^decoder\.layers\.(\d+)\.self_attn_norm\.(.*)$", r"transformer.decoder.layers.\1.norms.0.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn_norm\.(.*)$", r"transformer.decoder.layers.\1.norms.1.\2"),
    (r"^decoder\.layers\.(\d+)\.ffn_norm\.(.*)$", r"transformer.decoder.layers.\1.norms.2.\2"),
    (r"^decoder\.(ref_point_head|norm)\.(.*)$", r"transformer.decoder.\1.\2"),
    (r"^encoder\.layers\.(\d+)\.oesm_attn\.(.*)$", r"transformer.encoder.layers.\1.attentions.0.attn.\2"),
    (r"^encoder\.layers\.(\d+)\.cross_attn\.(.*)$", r"transformer.encoder.layers.\1.attentions.1.\2"),
    (r"^encoder\.layers\.(\d+)\.oesm_norm\.(.*)$", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"^encoder\.layers\.(\d+)\.cross_attn_norm\.(.*)$", r"transformer.encoder.layers.\1.norms.0.\2"),
    (r"^encoder\.layers\.(\d+)\.ffn_norm\.(.*)$", r"transformer.encoder.layers.\1.norms.1.\2"),
    (r"^dn_label_embed\.weight$", "label_enc.weight"),
    (r"^class_heads\.(\d+)\.(.*)$", r"class_embed.\1.\2"),
    (r"^box_heads\.(\d+)\.(.*)$", r"bbox_embed.\1.\2"),
    (r"^(backbone|neck)\.(.*)$", r"\1.\2"),
]


def official_checkpoint(model: focus_detr.FocusDETR) -> dict:
    """``{"model": state dict under official names (with the alias copies), "iteration": 0}``."""
    n_dec, n_enc = model.cfg.decoder.num_layers, model.cfg.encoder.num_layers
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        head = re.match(r"^proposal_(class|box)_head\.(.*)$", key)
        if head:
            new = f"{'class' if head.group(1) == 'class' else 'bbox'}_embed.{n_dec}.{head.group(2)}"
        else:
            new = next(re.sub(p, r, key) for p, r in _OURS_TO_OFFICIAL if re.match(p, key))
        sd[new] = value.clone()
    for key in list(sd):
        m = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
        if m:
            sd[f"transformer.decoder.{key}"] = sd[key]
            if m.group(1) == "class_embed" and int(m.group(2)) == n_dec:
                for i in range(n_enc):
                    sd[f"enhance_MCSP_layerlist.{i}.{m.group(3)}"] = sd[key]
                    sd[f"transformer.encoder.enhance_MCSP.{i}.{m.group(3)}"] = sd[key]
    return {"model": sd, "iteration": 0}


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
