"""`focus-detr train`: train Focus-DETR on a COCO-format dataset (one process, or DDP under torchrun)."""

from __future__ import annotations

import argparse
import ast
import signal
from typing import Any

from .options import add_device_option, add_quiet_option, add_threads_option, apply_threads, check_device

EPILOG = """\
DATA_DIR is recognised as COCO (`focus-detr make-data shapes` writes it), a Roboflow COCO export, YOLO
(data.yaml) or Pascal VOC; any other COCO json: --train-json FILE --train-images DIR (see docs/training.md):
  DATA_DIR/annotations/instances_train.json   DATA_DIR/images/train/...
  DATA_DIR/annotations/instances_val.json     DATA_DIR/images/val/...   (optional: periodic evaluation)

examples:
  focus-detr train --preset tiny --data data/shapes --out runs/shapes --max-iters 2000 --lr 2e-4 --backbone-lr 2e-4
  focus-detr train --preset r50_4scale_12ep --data /data/coco --out runs/r50 --schedule 12ep \\
      --backbone-weights imagenet --batch-size 2 --amp
  torchrun --nproc_per_node 8 -m focus_detr.cli.main train --preset r50_4scale_12ep --data /data/coco --out runs/r50
  focus-detr train ... --resume auto        # continue the newest complete checkpoint in --out
  focus-detr train --train-json my/train.json --train-images my/img --val-json my/val.json --val-images my/img --out runs/my
  focus-detr train --preset r50_4scale --init-weights focus_detr_r50_4scale_36ep --data my_coco ...  # fine-tune
  focus-detr train ... --overwrite          # replace the run in --out (without it an existing run is refused)

RUN_DIR holds one run: an existing run is refused unless --resume or --overwrite; RUN_DIR/.lock keeps a second
run out while one writes. SIGTERM, SIGUSR1 or Ctrl-C (to the process or the whole job) finish the step, write
a checkpoint and RUN_DIR/model_last.pth and exit 0 (130 for Ctrl-C); a second signal exits at once.

See docs/training.md for schedules, multi-node runs and what is logged."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: the value as a Python literal when it parses as one (``0.5``, ``None``, ``(1, 2)``),
    else the bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string, e.g. encoder.mode=dense
    return key.strip(), parsed


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train on a COCO-format dataset (CPU, one GPU, or many GPUs with torchrun)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="tiny", help="model preset (see `focus-detr info`); default tiny")
    g.add_argument("--data", metavar="DATA_DIR",
                   help="dataset folder: COCO, Roboflow COCO, YOLO or Pascal VOC layout (above); or use --train-json")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: checkpoints, logs, final weights")
    g.add_argument("--train-split", default="train", help="training split name (default train)")
    g.add_argument("--val-split", default="val", help="evaluation split name (default val); 'none' disables it")
    g.add_argument("--resume", metavar="auto|PATH",
                   help="continue a run: 'auto' = newest complete checkpoint in RUN_DIR (fresh start if none)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in RUN_DIR (its checkpoints, logs and weights are deleted)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentations and init (default 0)")
    add_device_option(g, note="; under torchrun each process takes GPU LOCAL_RANK")
    g.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, repeatable, e.g. --set decoder.num_queries=300 --set encoder.mode=dense")
    g.add_argument("--backbone-weights", metavar="PATH|imagenet",
                   help="ImageNet backbone: 'imagenet' (the official recipe's file for --preset's backbone, downloaded "
                        "once), a backbone name from `focus-detr models`, or a file (torchvision ResNet .pth, "
                        "detectron2 .pkl, Swin .pth); fresh runs only")
    g.add_argument("--init-weights", metavar="WEIGHTS",
                   help="fine-tune from a pretrained name, weights file, training checkpoint, official checkpoint or "
                        "zip of --preset, or Hugging Face folder; tensors of another shape (class heads of another "
                        "label set) start fresh")

    g = p.add_argument_group("dataset files (instead of or on top of --data)")
    g.add_argument("--train-json", metavar="FILE", help="COCO annotation json of the training split (any layout)")
    g.add_argument("--train-images", metavar="DIR", help="folder --train-json's file_name entries are relative to "
                   "(default: the json's folder)")
    g.add_argument("--val-json", metavar="FILE", help="COCO annotation json of the evaluation split")
    g.add_argument("--val-images", metavar="DIR", help="image folder of --val-json (default: the json's folder)")
    g.add_argument("--allow-outside-images", action="store_true",
                   help="accept file_name entries leaving the image folder (absolute paths, '..'); refused by default")

    g = p.add_argument_group("schedule and optimiser (official defaults)")
    g.add_argument("--schedule", default="12ep", choices=["12ep", "24ep", "36ep", "none"],
                   help="official step schedule scaled to this dataset and batch (default 12ep); see docs/training.md")
    g.add_argument("--max-iters", type=int, help="total iterations (overrides the schedule's length; its lr drop "
                   "stays at the same fraction)")
    g.add_argument("--lr-steps", type=_int_list, metavar="I1,I2", help="iterations at which the lr is multiplied by 0.1")
    g.add_argument("--warmup-iters", type=int, default=0, help="linear lr warm-up (default 0, as the official)")
    g.add_argument("--batch-size", type=int, default=2, help="images per process (default 2; total = x processes)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process (default 2)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--backbone-lr", type=float, default=1e-5,
                   help="lr of parameters named *backbone* (default 1e-5; use --lr's value for a backbone trained "
                        "from scratch)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4 (0 on normalisation layers)")
    g.add_argument("--clip-max-norm", type=float, default=0.1, help="gradient L2-norm clipping (default 0.1; 0 = off)")
    g.add_argument("--train-scales", type=_int_list, metavar="S1,S2",
                   help="shorter-side sizes for multi-scale training (default: 480..800 step 32 scaled to the preset)")
    g.add_argument("--max-size", type=int, help="longer-side cap in training (default: the preset's test max size)")
    g.add_argument("--crop", action="store_true", help="add detrex's random-crop augmentation branch (p=0.5)")
    g.add_argument("--no-flip", action="store_true", help="disable the horizontal flip")
    g.add_argument("--no-aspect-grouping", action="store_true",
                   help="batch images in stream order instead of grouping landscape and portrait images into separate "
                        "batches (the official sampler groups them: less padding)")
    g.add_argument("--amp", action="store_true", help="mixed precision (CUDA only; bf16, or fp16 with loss scaling)")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights; "
                   "evaluation uses it and RUN_DIR/model_final_ema.pth holds it")
    g.add_argument("--ema-decay", type=float, default=0.9998, help="EMA decay per step (default 0.9998)")

    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="COCO evaluation every N iterations (default 0: at the end)")
    g.add_argument("--patience", type=int, default=0, metavar="N",
                   help="stop when the validation AP has not improved for N evaluations (default 0: never); "
                        "RUN_DIR/model_best.pth always holds the best evaluated weights")
    g.add_argument("--eval-batch-size", type=int, default=1, help="images per process in evaluation (default 1)")
    g.add_argument("--max-eval-images", type=int, help="evaluate on the first N images only")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint every N iterations (default 1000)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (default 3; 0 = all)")
    g.add_argument("--log-every", type=int, default=20,
                   help="metrics.jsonl row (and, without a terminal, a progress line) every N iterations (default 20)")
    g.add_argument("--max-bad-steps", type=int, default=20,
                   help="stop after this many consecutive non-finite steps (default 20)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="timeout of every collective under torchrun: a dead rank stops the others (default 1800)")
    g.add_argument("--stop-at", type=int, metavar="ITER", help="checkpoint and stop at this iteration (resume later)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (slower)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip missing/unreadable training images with a counted warning instead of stopping")
    add_threads_option(g, note="; per process")
    add_quiet_option(g, no_progress_alias=True,
                     what="no progress bar: a summary line every --log-every iterations instead (as when stderr "
                          "is not a terminal)")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`~focus_detr.engine.TrainConfig` described by parsed ``train`` arguments."""
    from ..engine import TrainConfig
    from .errors import CLIError

    if args.data is None and args.train_json is None:
        raise CLIError("no dataset: pass --data DATA_DIR or --train-json FILE (see focus-detr train --help)")
    if args.train_images is not None and args.train_json is None:
        raise CLIError("--train-images needs --train-json")
    if args.val_images is not None and args.val_json is None:
        raise CLIError("--val-images needs --val-json")
    schedule = None if args.schedule == "none" else args.schedule
    if schedule is None and args.max_iters is None:
        raise CLIError("--schedule none needs --max-iters")
    if args.resume is not None and args.overwrite:
        raise CLIError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.patience < 0:
        raise CLIError(f"--patience must be >= 0, got {args.patience}")
    if args.patience and args.eval_every <= 0:
        raise CLIError("--patience counts evaluations: give --eval-every N as well")
    for name in ("batch_size", "max_iters", "log_every", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return TrainConfig(
        data_dir=args.data, out_dir=args.out, preset=args.preset, model_overrides=dict(args.overrides),
        train_split=args.train_split, val_split=None if args.val_split.lower() == "none" else args.val_split,
        train_json=args.train_json, train_images=args.train_images, val_json=args.val_json,
        val_images=args.val_images, allow_outside_images=args.allow_outside_images,
        schedule=schedule, max_iters=args.max_iters, lr_steps=args.lr_steps, warmup_iters=args.warmup_iters,
        batch_size=args.batch_size, num_workers=args.workers, lr=args.lr, backbone_lr=args.backbone_lr,
        weight_decay=args.weight_decay, clip_max_norm=args.clip_max_norm, train_scales=args.train_scales,
        train_max_size=args.max_size, flip=not args.no_flip, crop=args.crop, group_by_aspect=not args.no_aspect_grouping, seed=args.seed, device=args.device,
        amp=args.amp, ema=args.ema, ema_decay=args.ema_decay, eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size, max_eval_images=args.max_eval_images,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        resume=args.resume, overwrite=args.overwrite, patience=args.patience, max_bad_steps=args.max_bad_steps, dist_timeout_s=args.dist_timeout,
        stop_at=args.stop_at, deterministic=args.deterministic, skip_bad=args.skip_bad, backbone_weights=args.backbone_weights,
        init_weights=args.init_weights,
        progress=not args.quiet, tensorboard=not args.no_tensorboard,
    )


def run(args: argparse.Namespace) -> int:
    from ..api import CheckpointFormatError
    from ..data import DataError
    from ..engine import TrainingDivergedError, train
    from ..engine.distributed import DistributedError
    from ..engine.run_dir import RunDirError
    from ..engine.train import RunStorageError
    from .errors import CLIError

    cfg = config_from_args(args)
    check_device(args)
    apply_threads(args)
    try:
        result = train(cfg)
    except TrainingDivergedError as e:
        raise CLIError(str(e), code=3) from None
    except RunStorageError as e:
        raise CLIError(str(e), code=1) from None
    except (CheckpointFormatError, DataError, DistributedError, RunDirError) as e:
        raise CLIError(str(e)) from None
    # train() printed the summary (also into RUN_DIR/log.txt). Ctrl-C: the shell's code for an interrupt.
    if result.stop_reason == "signal" and result.stop_signal == signal.SIGINT:
        return 130
    return 0
