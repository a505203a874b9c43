"""The Trainer: its pieces used one by one, the model config made once per run, the checkpoint schema in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import focus_detr.config as config_module
from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine import checkpoint as ckpt
from focus_detr.engine import train
from focus_detr.engine.checkpoint import list_checkpoints
from focus_detr.engine.distributed import DistInfo
from focus_detr.engine.stopping import StopRequest
from train_utils import small_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

SRC = Path(__file__).resolve().parents[2] / "src" / "focus_detr"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_dataset(root, 4, 2, seed=4, image_size=(96, 128), min_object_size=8, objects_per_image=(1, 3))
    return root


def _train_module():
    import importlib

    return importlib.import_module("focus_detr.engine.train")  # the package attribute `train` is the function


def test_trainer_steps_one_by_one(data_dir, tmp_path):
    """Set-up, restore and describe at construction; step / log / checkpoint callable on their own."""
    train_module = _train_module()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = small_train_config(data_dir, run_dir, max_iters=3, batch_size=1)
    trainer = train_module.Trainer(cfg, DistInfo(), torch.device("cpu"), run_dir, StopRequest())
    assert trainer.model.cfg.num_classes == trainer.train_set.num_classes == 6
    assert trainer.start_iter == 0 and trainer.schedule.max_iters == 3 and trainer.val_set is None
    assert (run_dir / "config.json").is_file() and (run_dir / "environment.json").is_file()

    result = trainer.run()
    assert result.iteration == 3 and result.stop_reason == "done" and result.skipped_steps == 0
    assert [it for it, _ in list_checkpoints(run_dir)] == [3]
    assert result.final_weights == run_dir / "model_final.pth" and result.final_weights.is_file()
    trainer.logger.close()


def test_model_config_is_made_once_and_serialised_once_per_run(data_dir, tmp_path, monkeypatch):
    """The preset is resolved (make_config) once and the model config serialised once, however many
    checkpoints and files the run writes."""
    train_module = _train_module()
    calls = {"get_preset": 0, "config_to_dict": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    # get_preset is what every make_config(preset name, ...) starts with, whoever calls it.
    monkeypatch.setattr(config_module, "get_preset", counting("get_preset", config_module.get_preset))
    monkeypatch.setattr(train_module, "config_to_dict", counting("config_to_dict", train_module.config_to_dict))
    result = train(small_train_config(data_dir, tmp_path / "run", max_iters=3, batch_size=1, checkpoint_every=1,
                                      keep_checkpoints=0))
    assert result.iteration == 3 and len(list_checkpoints(tmp_path / "run")) == 3
    assert calls == {"get_preset": 1, "config_to_dict": 1}


def _documented_schema() -> list[str]:
    """The top-level keys listed in engine/checkpoint.py's docstring."""
    doc = ckpt.__doc__ or ""
    block = doc.split("cannot run code::\n\n", 1)[1].split("\n\n", 1)[0]
    return [m.group(1) for m in re.finditer(r"^    (\w+)\s", block, flags=re.M)]


def test_checkpoints_hold_exactly_the_documented_schema(data_dir, tmp_path):
    documented = _documented_schema()
    assert documented[:2] == ["format", "format_version"] and documented[-1] == "sha256"
    train(small_train_config(data_dir, tmp_path / "run", max_iters=2, batch_size=1))
    (_, path), = list_checkpoints(tmp_path / "run")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == documented
    assert raw["data"] == {"samples_per_process": 2, "batch_size": 1, "world_size": 1, "seed": 0}
    assert set(raw["counters"]) == {"skipped_steps", "best_ap", "best_iter", "evals_since_best"}


def test_only_checkpoint_py_assembles_a_checkpoint():
    """One function builds the checkpoint dict: no other module writes its schema's keys inline."""
    schema_only = {"grad_scaler", "samples_per_process", "evals_since_best"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "checkpoint.py" and path.parent.name == "engine":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if keys & schema_only:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("relative", ["engine", "cli"])
def test_engine_and_cli_import_no_private_names(relative):
    """``from module import _name`` reaches into another module's internals (cli/main.py's CLIError cycle was
    one); engine and cli import public names only."""
    found = []
    for path in (SRC / relative).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {', '.join(private)}")
            if isinstance(node, ast.ImportFrom) and node.module == "main" and node.level == 1:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: imports from cli.main")
    assert not found, found
