"""How the command line reports errors: the user's (one line, no traceback) and bugs (traceback + report hint)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import focus_detr
import focus_detr.config as config_module
from cli_utils import cli_command
from focus_detr.cli.errors import CLIError, is_user_error
from focus_detr.cli.main import main
from focus_detr.config import ConfigError, UnknownOptionError, UnknownPresetError, make_config


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n" * 8, b""])
def test_a_bad_weights_file_is_one_line_through_the_console_script(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    proc = _cli("info", str(bad))
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.pth" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "report" not in proc.stderr


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--max-iters", "1"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [TypeError("an argument of the wrong type"), KeyError("missing_key"),
                                   AttributeError("'NoneType' object has no attribute 'cfg'")])
def test_an_unexpected_exception_prints_its_traceback_and_a_report_hint(monkeypatch, capsys, error):
    def broken(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(config_module, "config_to_dict", broken)  # info_cmd reads it from focus_detr.config
    code = main(["info", "tiny", "--json"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err  # where the bug is
    last = err.strip().splitlines()[-1]
    assert f"focus-detr {focus_detr.__version__}" in last and "bug" in last and "report" in last
    assert type(error).__name__ in last
    assert not err.startswith("error: ")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(Exception, match="dataset folder not found"):
        main(["--debug", "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
              "--max-iters", "1"])


def test_unknown_presets_and_options_are_user_errors_yet_keep_their_builtin_types():
    with pytest.raises(UnknownPresetError) as preset:
        make_config("no_such_preset")
    assert isinstance(preset.value, KeyError) and isinstance(preset.value, ConfigError)
    assert str(preset.value).startswith("unknown preset 'no_such_preset'")  # not KeyError's quoted repr
    with pytest.raises(UnknownOptionError) as option:
        make_config("tiny", **{"decoder.bogus": 1})
    assert isinstance(option.value, TypeError) and "decoder.bogus" in str(option.value)
    assert is_user_error(preset.value) and is_user_error(option.value)


def test_which_errors_are_the_users():
    assert is_user_error(CLIError("x")) and is_user_error(FileNotFoundError(2, "No such file", "a.json"))
    assert is_user_error(ValueError("bad value")) and is_user_error(PermissionError(13, "denied"))
    # A missing optional package is the user's to install; a broken import inside the package is a bug.
    assert is_user_error(ImportError("export needs onnx: pip install 'focus-detr[onnx]'"))
    assert is_user_error(ModuleNotFoundError("No module named 'onnx'", name="onnx"))
    assert not is_user_error(ImportError("cannot import name 'x'", name="focus_detr.engine.train"))
    for bug in (TypeError("t"), KeyError("k"), AttributeError("a"), IndexError("i"), RuntimeError("r")):
        assert not is_user_error(bug)


def test_unknown_model_option_through_train_is_one_line(tmp_path, capsys):
    from focus_detr.data import ensure_shapes_dataset

    ensure_shapes_dataset(tmp_path / "d", 1, 0, seed=0, image_size=(64, 64))
    code = main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--max-iters", "1",
                 "--val-split", "none", "--set", "encoder.bogus=3", "--quiet", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: unknown model option 'encoder.bogus'"), err


def test_module_entry_point_reports_command_errors(tmp_path):
    """``python -m focus_detr.cli.main`` (as under torchrun) catches the commands' CLIError too."""
    proc = subprocess.run([sys.executable, "-m", "focus_detr.cli.main", "train", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no dataset"), proc.stderr
