"""`focus-detr make-data`: write the built-in synthetic dataset in the COCO layout."""

from __future__ import annotations

import argparse

EPILOG = """\
Writes DIR/annotations/instances_{train,val}.json and DIR/images/{train,val}/*.jpg: the layout
`focus-detr train --data DIR` reads. The output is deterministic for a seed; an existing complete copy made
with the same parameters is kept unless --force.

kinds:
  shapes          192x256 images, 1-6 objects (mostly medium), light clutter: the demo's dataset
  crowded-shapes  384x512 images, 8-24 objects (about half small), 3x clutter and dull decoy shapes: most
                  tokens are background, so token selection matters (used by `focus-detr compare-modes`)
--image-size, --objects, --min-object-size and --clutter override the kind's values.

examples:
  focus-detr make-data shapes --out data/shapes --train 1000 --val 100 --seed 0
  focus-detr make-data crowded-shapes --out data/crowded --train 600 --val 100"""


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 192,256), got {text!r}") from None
    return h, w


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("make-data", help="generate the built-in synthetic 'shapes' dataset (COCO format)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["shapes", "crowded-shapes"],
                   help="dataset to generate: 6 classes of textured shapes on cluttered backgrounds (see below)")
    p.add_argument("--out", metavar="DIR", help="output folder (default data/KIND, e.g. data/shapes)")
    p.add_argument("--train", type=int, default=1000, metavar="N", help="training images (default 1000)")
    p.add_argument("--val", type=int, default=100, metavar="M", help="validation images (default 100)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--image-size", type=_size, metavar="H,W", help="image size (default 192,256; crowded: 384,512)")
    p.add_argument("--objects", type=int, metavar="K", help="at most K objects per image (default 6; crowded: 24)")
    p.add_argument("--min-object-size", type=int, help="smallest object side in pixels (default 12; crowded: 10)")
    p.add_argument("--clutter", type=float, metavar="X",
                   help="background clutter multiplier in [1, 10] (default 1; crowded: 3)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image format (default jpg)")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching copy exists")
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import SHAPES_LAYOUTS, ensure_shapes_dataset, make_shapes_dataset
    from .errors import CLIError

    if args.train < 1 or args.val < 0:
        raise CLIError("--train must be >= 1 and --val >= 0")
    if args.objects is not None and args.objects < 1:
        raise CLIError("--objects must be >= 1")
    if args.out is None:
        args.out = f"data/{args.kind}"
    layout = SHAPES_LAYOUTS[args.kind].as_kwargs()
    if args.image_size is not None:
        layout["image_size"] = args.image_size
    if args.objects is not None:
        lo = min(layout["objects_per_image"][0], args.objects)
        layout["objects_per_image"] = (lo, args.objects)
    if args.min_object_size is not None:
        layout["min_object_size"] = args.min_object_size
    if args.clutter is not None:
        layout["clutter"] = args.clutter
    make = make_shapes_dataset if args.force else ensure_shapes_dataset
    try:
        info = make(args.out, args.train, args.val, seed=args.seed, image_format=args.format, **layout)
    except ValueError as e:
        raise CLIError(f"make-data {args.kind}: {e}") from None
    verb = f"generated in {info.seconds:.1f} s" if info.generated else "already present (same parameters)"
    print(f"{args.kind} dataset {verb}: {info.root}")
    print(f"  train: {info.num_train} images, {info.num_train_boxes} boxes -> {info.train_annotations}")
    print(f"  val:   {info.num_val} images, {info.num_val_boxes} boxes -> {info.val_annotations}")
    print(f"  classes: {', '.join(info.class_names)}")
    return 0
