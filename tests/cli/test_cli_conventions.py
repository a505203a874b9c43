"""One set of command-line conventions: every command has --help; --device, --threads and --quiet mean the same
on every command that runs a model; device strings are checked in one place (focus_detr.devices) with one-line
errors. CI has no GPU: the CUDA cases hide the GPUs (CUDA_VISIBLE_DEVICES="" in subprocesses, a patched
torch.cuda in-process), so they behave the same on a GPU machine."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focus_detr import devices
from focus_detr.cli.main import COMMANDS, build_parser, main
from focus_detr.devices import DeviceError, check_device_name, resolve_device
from focus_detr.engine.distributed import DistInfo, process_device
from cli_utils import make_picture, run_cli, save_tiny_weights

ALL_COMMANDS = [name.replace("_", "-") for name in COMMANDS]
# Commands that run a model: each has --device, --threads and --quiet.
RUNS_A_MODEL = ["demo", "train", "eval", "predict", "explain", "export", "convert", "benchmark", "app"]
# Commands whose old --no-progress flag stays accepted (hidden) as an alias of --quiet.
HAD_NO_PROGRESS = ["demo", "train", "eval"]
# The smallest argument list each command parses with (positionals and required options only).
MINIMAL = {
    "demo": [], "make-data": ["shapes"], "train": ["--data", "d", "--out", "o"], "eval": ["w.pth", "--data", "d"],
    "predict": ["w.pth", "a.jpg", "--out", "o"], "explain": ["w.pth", "a.jpg", "--out", "o"],
    "export": ["w.pth", "--format", "onnx", "o.onnx"], "convert": ["a.pth", "b.pth"], "info": ["tiny"],
    "models": [], "benchmark": [], "compare-modes": ["--data", "d", "--out", "o"], "app": [],
}


def subparser(command: str) -> argparse.ArgumentParser:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[command]


def parse(command: str, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *MINIMAL[command], *extra])


def test_minimal_table_covers_every_command() -> None:
    assert sorted(MINIMAL) == sorted(ALL_COMMANDS)
    assert set(RUNS_A_MODEL) <= set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: focus-detr {command}" in text
    parse(command)  # and parses its minimal form


@pytest.mark.parametrize("command", RUNS_A_MODEL)
def test_device_threads_quiet_on_every_command_that_runs_a_model(command: str) -> None:
    options = subparser(command)._option_string_actions
    for flag in ("--device", "--threads", "--quiet"):
        assert flag in options, f"{command} lacks {flag}"
    assert options["--device"].type is devices.device_name_arg  # the one validator
    args = parse(command, "--device", "cuda:1", "--threads", "3", "--quiet")
    assert (args.device, args.threads, args.quiet) == ("cuda:1", 3, True)
    assert parse(command, "--threads", "auto").threads == "auto"
    assert parse(command).quiet is False


@pytest.mark.parametrize("command", HAD_NO_PROGRESS)
def test_no_progress_is_a_hidden_alias_of_quiet(command: str, capsys) -> None:
    assert parse(command, "--no-progress").quiet is True
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--no-progress" not in capsys.readouterr().out


@pytest.mark.parametrize("command", RUNS_A_MODEL)
@pytest.mark.parametrize("value, message", [
    ("0", "a GPU is written cuda:0"), ("gpu", "a GPU is written cuda"), ("cuda:x", "invalid device"),
    ("cpu:0", "invalid device"), ("tpu", "invalid device"), ("", "invalid device"),
])
def test_malformed_device_is_a_usage_error(command: str, value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(command, "--device", value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --device: invalid device {value!r}: expected auto, cpu, cuda, cuda:N or mps" in err
    assert message in err


@pytest.mark.parametrize("command", RUNS_A_MODEL)
@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_threads_is_a_usage_error(command: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(command, "--threads", value)
    assert exit_info.value.code == 2
    assert "argument --threads: expected a positive number of threads or 'auto'" in capsys.readouterr().err


@given(st.text(max_size=12))
@settings(max_examples=300, deadline=None)
def test_device_names_accepted_exactly(text: str) -> None:
    """The grammar is auto | cpu | mps | cuda | cuda:N (any case, surrounding spaces); everything else is one
    DeviceError line."""
    import re

    norm = text.strip().lower()
    match = re.fullmatch(r"(auto|cpu|mps|cuda)(:[0-9]+)?", norm)
    valid = match is not None and (match.group(2) is None or match.group(1) == "cuda")
    try:
        name = check_device_name(text)
        assert valid and name == (norm if match.group(2) is None else f"cuda:{int(match.group(2)[1:])}")
    except DeviceError as e:
        assert not valid and "\n" not in str(e) and "expected auto, cpu, cuda, cuda:N or mps" in str(e)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """A pretend machine with two GPUs (nothing is allocated on them)."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    return selected


def test_resolve_device_without_gpu(no_cuda, monkeypatch) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=f"device '{name}' requested but CUDA is not available"):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS .* is not available"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="invalid device '1'"):
        resolve_device("1")


def test_resolve_device_with_gpus(two_gpus, monkeypatch) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:2' requested but only 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


def test_process_device_rules(two_gpus) -> None:
    """One process may name its GPU; under torchrun each process takes GPU LOCAL_RANK."""
    assert process_device("cuda:1", DistInfo()) == torch.device("cuda", 1)
    assert process_device("auto", DistInfo(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    assert process_device("cuda", DistInfo(rank=0, world_size=2, local_rank=0)) == torch.device("cuda", 0)
    assert two_gpus == [1, 1, 0]
    with pytest.raises(DeviceError, match="under torchrun each process takes GPU LOCAL_RANK"):
        process_device("cuda:1", DistInfo(rank=0, world_size=2, local_rank=0))
    with pytest.raises(DeviceError, match="LOCAL_RANK 2 but only 2 GPU"):
        process_device("cuda", DistInfo(rank=2, world_size=3, local_rank=2))
    assert process_device("cpu", DistInfo(rank=1, world_size=2, local_rank=1)) == torch.device("cpu")


def test_predict_threads_quiet_and_device_in_process(tmp_path: Path, capsys) -> None:
    make_picture(tmp_path / "a.jpg", (48, 64), 0)
    previous = torch.get_num_threads()
    try:
        assert main(["predict", "--preset", "tiny", "--random-init", str(tmp_path / "a.jpg"), "--out",
                     str(tmp_path / "o"), "--device", "CPU", "--threads", "1", "--quiet", "--no-draw"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    captured = capsys.readouterr()
    assert "model:" not in captured.err and "results:" in captured.out


def test_make_data_has_a_default_out(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["make-data", "shapes", "--train", "1", "--val", "1", "--image-size", "64,64"]) == 0
    assert (tmp_path / "data" / "shapes" / "annotations" / "instances_train.json").is_file()


def test_help_texts_promise_only_what_is_written(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_help = capsys.readouterr().out
    # The demo's recipe has no EMA (no switch for it either): it writes (and evaluates) model_final.pth.
    from focus_detr.engine.demo import RECIPE

    assert not hasattr(RECIPE, "ema") and "model_final_ema.pth" not in demo_help and "model_final.pth" in demo_help
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    assert "commit" not in capsys.readouterr().out


# End to end through the console script, with the GPUs hidden: one line on stderr, exit code 2, no traceback.
@pytest.mark.parametrize("args, message", [
    (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--device", "mps"],
     "error: device 'mps' requested but MPS (Apple GPU) is not available"),
    (["eval", "{w}", "--data", "{tmp}", "--device", "0"],
     "argument --device: invalid device '0': expected auto, cpu, cuda, cuda:N or mps (a GPU is written cuda:0)"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/run", "--device", "cuda:1"],
     "error: device 'cuda:1' requested but CUDA is not available"),
    (["eval", "{w}", "--data", "{tmp}", "--device", "cuda"], "error: device 'cuda' requested but CUDA is not available"),
    (["benchmark", "--preset", "tiny", "--device", "cuda:0"], "error: device 'cuda:0' requested but CUDA is not available"),
    (["convert", "{w}", "{tmp}/c.pt", "--device", "cuda"], "error: device 'cuda' requested but CUDA is not available"),
])
def test_device_errors_through_the_console_script(tmp_path: Path, args: list[str], message: str) -> None:
    weights = save_tiny_weights(tmp_path / "w.pt")
    proc = run_cli(*[a.format(tmp=tmp_path, w=weights) for a in args], env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith(("error:", "focus-detr"))]) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.pt").exists()  # refused before any work
