"""Which model class each dataset category is, checked before anything is evaluated.

A model's label ``i`` means ``class_names[i]`` (stored with the weights); a dataset's annotations use its
own category ids. :func:`map_categories` pairs them

* by name, when the model has class names;
* by position (categories sorted by id = labels ``0..K-1``) when it has none, and only when the counts agree;
* as the user says with a class map (``focus-detr eval --class-map``): a JSON object
  ``{dataset category id or name: model class index or name, or null}``; ``null`` leaves a category out of
  the evaluation. Entries override the name matching; categories without any box may stay unmapped.

Anything else is a :class:`ClassMismatchError` (one line, saying how to write the map), never a wrong AP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from focus_detr.data.errors import DataError

CLASS_MAP_HELP = ("--class-map '{\"DATASET_CATEGORY\": MODEL_CLASS, ...}' (dataset category id or name -> "
                  "model class index or name; null leaves a category out)")


class ClassMismatchError(DataError):
    """The model's classes and the dataset's categories cannot be paired without a class map."""


def parse_class_map(text: str | Path) -> dict[str, Any]:
    """A class map from a JSON object written inline or a path to a ``.json`` file holding one."""
    raw = str(text)
    source = None
    if not raw.lstrip().startswith(("{", "[", '"')):  # not inline JSON: a file holding it
        source = Path(raw)
        try:
            raw = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the class map ({e})", source) from None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise DataError(f"the class map is not valid JSON ({str(e)[:200]}); expected {CLASS_MAP_HELP}",
                        source) from None
    if not isinstance(value, dict):
        raise DataError(f"the class map must be a JSON object, got {type(value).__name__}; expected "
                        f"{CLASS_MAP_HELP}", source)
    for k, v in value.items():
        if v is not None and not isinstance(v, (int, str)) or isinstance(v, bool):
            raise DataError(f"class map entry {k!r}: the value must be a model class index, a name or null, "
                            f"got {v!r}", source)
    return value


def map_categories(categories: Sequence[Mapping[str, Any]], annotated: set[int],
                   class_names: Sequence[str] | None, num_classes: int,
                   class_map: Mapping[str, Any] | None = None, source: str | Path | None = None) -> dict[int, int]:
    """``{category_id: model label}`` for the categories to evaluate.

    Args:
        categories: the dataset's ``categories`` records (``id``, ``name``), already validated.
        annotated: the ids of the categories that have at least one box.
        class_names: the model's class names (``None``: the model has none).
        num_classes: the model's number of classes.
        class_map: see the module docstring (already parsed, e.g. by :func:`parse_class_map`).
        source: the annotation file, named in errors.
    """
    cats = {int(c["id"]): str(c["name"]) for c in categories}
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    by_name: dict[str, int] = {}
    for cid, name in cats.items():
        by_name.setdefault(name, cid)
    mapping: dict[int, int] = {}
    left_out: set[int] = set()

    for key, value in (class_map or {}).items():
        key_text = str(key).strip()
        if key_text.lstrip("-").isdigit() and int(key_text) in cats:
            cid = int(key_text)
        elif key_text in by_name:
            cid = by_name[key_text]
        else:
            raise ClassMismatchError(f"class map key {key!r} is neither a category id nor a category name of the "
                                     f"dataset (categories: {_preview(cats)})", source)
        if value is None:
            left_out.add(cid)
            continue
        mapping[cid] = _model_label(value, names, num_classes, source)

    if class_map is None and names is None:
        if len(cats) != num_classes:
            example = ", ".join(f'"{cid}": {k}' for k, cid in enumerate(sorted(cats)[:2]))
            raise ClassMismatchError(
                f"the model has {num_classes} classes without names but the dataset has {len(cats)} categories, "
                f"so they cannot be paired; say which model class each category is with --class-map "
                f"'{{{example}, ...}}' (dataset category id or name -> model class index or name; null leaves a "
                "category out)", source)
        return {cid: k for k, cid in enumerate(sorted(cats))}

    if names is not None:
        index = {n: i for i, n in enumerate(names)}
        for cid, name in cats.items():
            if cid not in mapping and cid not in left_out and name in index:
                mapping[cid] = index[name]

    missing = sorted(cid for cid in annotated if cid not in mapping and cid not in left_out)
    if missing:
        shown = [cats[c] for c in missing[:3]]
        example = ", ".join(f'"{n}": "MODEL_CLASS"' for n in shown[:2])
        model = (f"{num_classes} classes: {_preview(dict(enumerate(names)))}" if names is not None
                 else f"{num_classes} unnamed classes 0..{num_classes - 1}")
        raise ClassMismatchError(
            f"dataset categories {shown}{' ...' if len(missing) > 3 else ''} ({len(missing)} with boxes) are not "
            f"classes of the model ({model}); map them with --class-map '{{{example}}}' (dataset category id or "
            "name -> model class index or name; null leaves a category out)", source)
    seen: dict[int, int] = {}
    for cid, label in sorted(mapping.items()):
        if label in seen:
            raise ClassMismatchError(f"categories {cats[seen[label]]!r} and {cats[cid]!r} both map to model class "
                                     f"{label}; each model class can stand for one category only", source)
        seen[label] = cid
    if not mapping:
        raise ClassMismatchError("no dataset category maps to a model class: nothing to evaluate", source)
    return mapping


def _model_label(value: Any, names: list[str] | None, num_classes: int, source: str | Path | None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num_classes:
            raise ClassMismatchError(f"class map value {value} is not a model class index (0..{num_classes - 1})",
                                     source)
        return value
    if names is None:
        raise ClassMismatchError(f"class map value {value!r}: the model has no class names; use class indices "
                                 f"0..{num_classes - 1}", source)
    if value not in names:
        raise ClassMismatchError(f"class map value {value!r} is not a class of the model "
                                 f"({_preview(dict(enumerate(names)))})", source)
    return names.index(value)


def _preview(items: Mapping[int, str], limit: int = 8) -> str:
    shown = [f"{k}={v}" for k, v in list(items.items())[:limit]]
    return ", ".join(shown) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def categories_with_boxes(data: Mapping[str, Any]) -> set[int]:
    """Ids of the categories used by at least one annotation of a (validated) COCO dict."""
    return {int(a["category_id"]) for a in data.get("annotations") or [] if isinstance(a, dict)
            and isinstance(a.get("category_id"), int)}
