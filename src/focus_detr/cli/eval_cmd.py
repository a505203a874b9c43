"""`focus-detr eval`: COCO box AP of a model on a split of a COCO-format dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_device_option, add_quiet_option, add_threads_option, apply_threads, check_device

EPILOG = """\
WEIGHTS is one of
  * a pretrained name (`focus-detr models` lists them), downloaded once into the cache;
  * a focus-detr weights file (RUN_DIR/model_final.pth, `focus-detr convert` output): the model is rebuilt
    from the config stored in it;
  * a training checkpoint (RUN_DIR/checkpoints/checkpoint_*.pth; --ema takes its EMA weights);
  * an official detrex Focus-DETR checkpoint or release zip, with --preset naming its config (default:
    guessed from its keys);
  * a Hugging Face folder (config.json + model.safetensors).

DATA_DIR is any layout `train` accepts (COCO, Roboflow COCO, YOLO, Pascal VOC); or --json FILE --images DIR.
The model's classes are paired with the dataset's categories before anything runs: by name (names stored
with the weights), else by count; anything else is refused with a hint to --class-map, a JSON object
{dataset category id or name: model class index or name, or null to leave a category out}.

Writes OUT/predictions.json (COCO results format, the annotation file's category ids), OUT/metrics.json
(AP, AP50, AP75, APs, APm, APl, ARs and per-class AP, fractions) and OUT/coco_summary.txt.

examples:
  focus-detr eval runs/shapes/model_final.pth --data data/shapes
  focus-detr eval focus_detr_r50_4scale_36ep --data /data/coco --split val2017
  focus-detr eval focus_detr_r50_36ep.pth --preset r50_4scale --data /data/coco --split val2017
  focus-detr eval model_final.pth --json my/val.json --images my/img --class-map '{"car": "truck", "7": null}'
  torchrun --nproc_per_node 8 -m focus_detr.cli.main eval model_final.pth --data /data/coco --split val2017"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="COCO evaluation of a weights file or checkpoint on a dataset split",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", metavar="WEIGHTS", help="pretrained name, weights file, training checkpoint, official "
                   "checkpoint or zip, or Hugging Face folder")
    p.add_argument("--data", metavar="DATA_DIR",
                   help="dataset folder (COCO, Roboflow COCO, YOLO or Pascal VOC layout); or --json/--images")
    p.add_argument("--json", metavar="FILE", help="COCO annotation json to evaluate on (instead of --data)")
    p.add_argument("--images", metavar="DIR", help="folder --json's file_name entries are relative to "
                   "(default: the json's folder)")
    p.add_argument("--class-map", metavar="JSON|FILE",
                   help="which model class each dataset category is: '{\"dog\": \"hound\", \"3\": 0, \"7\": null}' "
                        "(dataset category id or name -> model class index or name; null leaves it out) or a .json file")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept file_name entries leaving the image folder (absolute paths, '..'); refused by default")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: eval_SPLIT next to WEIGHTS)")
    p.add_argument("--preset", help="preset of an official checkpoint (default: guessed from its keys; ignored for "
                   "our own files)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--short-side", type=int, help="test-time shorter side (default: the model's)")
    p.add_argument("--max-size", type=int, help="test-time longer-side cap (default: the model's)")
    add_device_option(p, note="; under torchrun each process takes GPU LOCAL_RANK")
    add_threads_option(p)
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS", help="collective timeout under torchrun")
    add_quiet_option(p, no_progress_alias=True)
    return p


def load_any_model(path: str | Path, preset: str | None = None, ema: bool = False, progress: bool = True,
                   **overrides):
    """A :class:`~focus_detr.model.FocusDETR` from any weights source (:func:`focus_detr.weights.kinds.load_model`;
    ``progress``: the download bar of a pretrained name). Raises ``CheckpointFormatError`` with the reason."""
    from ..weights.kinds import load_model

    return load_model(path, preset, ema, progress=progress, **overrides)[0]


def run(args: argparse.Namespace) -> int:
    from ..engine.distributed import env_dist_info, process_device
    from .errors import CLIError

    if args.batch_size <= 0:
        raise CLIError("--batch-size must be positive")
    if args.data is None and args.json is None:
        raise CLIError("no dataset: pass --data DATA_DIR or --json FILE (see focus-detr eval --help)")
    if args.images is not None and args.json is None:
        raise CLIError("--images needs --json")
    check_device(args)
    apply_threads(args)
    info = env_dist_info(args.dist_timeout)
    out = Path(args.out) if args.out else Path(args.weights).resolve().parent / f"eval_{args.split}"
    device = process_device(args.device, info)
    # An unwritable --out fails now, not after the evaluation; a folder made here is removed again if the
    # command fails before writing into it (a refused dataset or weights file leaves nothing behind).
    made_out = info.is_main and not out.exists()
    if info.is_main:
        from .predict_cmd import check_output_folder

        check_output_folder(str(out))
    try:
        return _evaluate(args, info, device, out)
    except BaseException:
        if made_out:
            try:
                out.rmdir()  # only if still empty
            except OSError:
                pass
        raise


def _evaluate(args: argparse.Namespace, info, device, out: Path) -> int:
    """``run`` after the argument and --out checks."""
    import json

    from ..api import CheckpointFormatError
    from ..data import DataError
    from ..data.class_map import parse_class_map
    from ..data.layouts import require_split
    from ..engine.data import build_eval_dataset
    from ..engine.distributed import DistributedError, cleanup_distributed, init_distributed
    from ..engine.evaluate import evaluate, format_metrics
    from .errors import CLIError

    overrides = {}
    if args.short_side:
        overrides["test_short_side"] = args.short_side
    if args.max_size:
        overrides["test_max_size"] = args.max_size
    try:
        class_map = parse_class_map(args.class_map) if args.class_map is not None else None
        model = load_any_model(args.weights, args.preset, args.ema, progress=not args.quiet, **overrides).to(device)
        source = require_split(args.data, args.split, args.json, args.images)
        dataset = build_eval_dataset(source, args.split, model.cfg.test_short_side, model.cfg.test_max_size,
                                     model.cfg.class_names, model.cfg.num_classes, class_map,
                                     args.allow_outside_images)
        init_distributed(info, device)
        try:
            metrics = evaluate(model, dataset, device, out, info, args.batch_size, args.workers, args.max_images,
                               progress=not args.quiet,
                               extra={"weights": str(args.weights), "split": args.split,
                                      "data": str(args.data if args.json is None else args.json),
                                      "class_map": class_map})
        finally:
            cleanup_distributed()
    except (CheckpointFormatError, DataError, DistributedError) as e:
        raise CLIError(str(e)) from None
    if metrics is not None:
        print(metrics.get("summary", ""))
        print(f"{args.split}: {format_metrics(metrics)}")
        per_class = metrics.get("per_class", {})
        if per_class:
            print("per-class AP: " + json.dumps({k: (round(v, 3) if v is not None else None)
                                                  for k, v in per_class.items()}))
        print(f"wrote {out}/metrics.json and {out}/predictions.json")
    return 0
