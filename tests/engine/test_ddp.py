"""Two-process CPU DDP (gloo): identical replicas, rank-0-only files, a dead rank fails the job in bounded time."""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine.logging import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(data_dir: str, out: str, **kw):
    from focus_detr.engine import TrainConfig

    base = dict(data_dir=data_dir, out_dir=out, preset="tiny", val_split="val", schedule=None, max_iters=4,
                batch_size=1, num_workers=0, lr=2e-4, backbone_lr=2e-4, train_scales=(96,), train_max_size=200,
                seed=0, checkpoint_every=2, log_every=1, eval_every=4, progress=False, tensorboard=False, device="cpu",
                dist_timeout_s=30.0,
                model_overrides={"decoder.num_queries": 20, "encoder.oesm_topk": 20, "test_short_side": 96})
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank: int, world: int, port: int, data_dir: str, out: str, result_dir: str, mode: str) -> None:
    """One DDP process (module-level so spawn can import it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import focus_detr.api as api_module
    import focus_detr.engine.checkpoint as ckpt_module
    # (importlib: the package attribute `focus_detr.engine.train` is the train function, not the module)
    train_module = importlib.import_module("focus_detr.engine.train")
    from focus_detr.engine.logging import MetricsLogger
    from focus_detr.losses import SetCriterion

    # Count every file-writing call this process makes.
    writes = {"checkpoint": 0, "weights": 0, "json": 0, "metrics": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            writes[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    ckpt_module.save_checkpoint = counting("checkpoint", ckpt_module.save_checkpoint)
    api_module.save = counting("weights", api_module.save)
    train_module.write_json = counting("json", train_module.write_json)
    original_write = MetricsLogger.write

    def write(self, row):
        if self.enabled:
            writes["metrics"] += 1
        return original_write(self, row)

    MetricsLogger.write = write
    if mode == "die" and rank == 1:
        original_forward = SetCriterion.forward
        calls = {"n": 0}

        def forward(self, outputs, targets):
            calls["n"] += 1
            if calls["n"] == 2:
                os._exit(17)  # a crashed process: no clean-up, no goodbye to the others
            return original_forward(self, outputs, targets)

        SetCriterion.forward = forward

    from focus_detr.engine import train

    result_path = Path(result_dir) / f"rank{rank}.json"
    start = time.monotonic()
    try:
        result = train(_cfg(data_dir, out))
    except Exception as e:  # noqa: BLE001 - reported to the test
        result_path.write_text(json.dumps({"error": type(e).__name__, "message": str(e),
                                           "seconds": time.monotonic() - start}))
        return
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
               Path(result_dir) / f"rank{rank}_state.pt")
    result_path.write_text(json.dumps({"writes": writes, "iteration": result.iteration,
                                       "metrics": result.eval_metrics is not None,
                                       "seconds": time.monotonic() - start}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_dataset(root, 6, 3, seed=2, image_size=(96, 128), min_object_size=8, objects_per_image=(1, 3))
    return root


def _launch(tmp_path, data_dir, mode: str, timeout: float):
    ctx = mp.get_context("spawn")
    port = _free_port()
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(data_dir), str(out), str(results), mode))
             for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"{len(alive)} process(es) still running after {timeout} s"
    return out, results, [p.exitcode for p in procs]


def test_two_process_ddp_replicas_identical_and_rank0_writes(tmp_path, data_dir):
    out, results, codes = _launch(tmp_path, data_dir, "normal", timeout=240)
    assert codes == [0, 0]
    r0 = json.loads((results / "rank0.json").read_text())
    r1 = json.loads((results / "rank1.json").read_text())
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["iteration"] == r1["iteration"] == 4

    # Replicas hold identical parameters (and buffers) after training.
    s0 = torch.load(results / "rank0_state.pt", weights_only=True)
    s1 = torch.load(results / "rank1_state.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)

    # Only rank 0 wrote files; rank 0 got the (gathered) evaluation result.
    assert r1["writes"] == {"checkpoint": 0, "weights": 0, "json": 0, "metrics": 0}
    # weights: model_best.pth (the evaluation at iteration 4), model_last.pth and model_final.pth
    assert r0["writes"]["checkpoint"] == 2 and r0["writes"]["weights"] == 3 and r0["writes"]["metrics"] > 0
    assert r0["metrics"] and not r1["metrics"]
    rows = read_metrics(out / "metrics.jsonl")
    assert sum(r.get("event") == "start" for r in rows) == 1 and sum(r.get("event") == "done" for r in rows) == 1
    eval_rows = [r for r in rows if r["type"] == "eval"]
    assert len(eval_rows) == 1 and eval_rows[0]["num_images"] == 3  # both shards merged: all val images

    # The checkpoint holds both ranks' generator states and the sampler position.
    from focus_detr.engine import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "checkpoint_0000004.pth")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["data"] == {"samples_per_process": 4, "batch_size": 1, "world_size": 2, "seed": 0}
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["total_batch_size"] == 2


def test_dead_rank_stops_the_other_with_a_clear_error(tmp_path, data_dir):
    out, results, codes = _launch(tmp_path, data_dir, "die", timeout=150)
    assert codes[1] == 17
    r0 = json.loads((results / "rank0.json").read_text())
    assert r0.get("error") == "DistributedError", r0
    assert "Another process of the job probably died" in r0["message"]
    assert r0["seconds"] < 120  # bounded by --dist-timeout (30 s here), not a hang
