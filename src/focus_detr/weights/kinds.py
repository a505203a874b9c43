"""Every kind of model file, recognised in one place, read into (config, state dict in our names).

Kinds (:func:`identify` names them; ``focus-detr info`` prints the name):

``weights``     our weights file (``focus_detr.save`` / ``model_final.pth`` / ``focus-detr convert``):
                ``{format: "focus-detr-weights", format_version, config, state_dict, extra, sha256}``;
``checkpoint``  a training checkpoint (``RUN/checkpoints/checkpoint_*.pth``): its raw weights, or its EMA
                weights with ``ema=True`` (``--ema``);
``official``    an official detrex / detectron2 Focus-DETR checkpoint (``{"model": state_dict}`` or a bare
                state dict, ``.pth`` or detectron2 ``.pkl``): needs a preset, or one is guessed from the
                keys and shapes (and the guess is said);
``zip``         a zip archive as the official release ships it, holding exactly one checkpoint file (under
                any name) of one of the kinds above;
``hf``          a folder in the Hugging Face layout: ``config.json`` + ``model.safetensors``;
``registry``    a pretrained name from :mod:`focus_detr.weights.registry` (downloaded and cached);
``hub``         a Hugging Face Hub repo id ``org/name`` (needs the optional ``huggingface_hub``).

Nothing is built before the config stored in a file passed its bounds (:mod:`.validate`) and was found
to describe no more values than the file holds, so a crafted file cannot make us allocate without bound.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import PRESETS, FocusDETRConfig, config_to_dict, make_config
from ..convert.official import (CheckpointMismatchError, ConversionReport, convert_official_state_dict,
                                 load_converted)
from .files import CheckpointFormatError, read_numpy_pickle, read_torch_file, tree_digest
from .validate import check_size, config_from_file_dict

WEIGHTS_FORMAT = "focus-detr-weights"
WEIGHTS_FORMAT_VERSION = 2  # 2: the checksum covers format, config, state dict and extra (1: tensors only)
CHECKPOINT_FORMAT = "focus-detr-train-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

KINDS = ("weights", "checkpoint", "official", "zip", "hf", "registry", "hub")
KIND_NAMES = {
    "weights": "focus-detr weights file", "checkpoint": "focus-detr training checkpoint",
    "official": "official detrex checkpoint", "zip": "zip archive", "hf": "Hugging Face folder",
    "registry": "pretrained model name", "hub": "Hugging Face Hub repo id",
}
_HF_CONFIG, _HF_TENSORS = "config.json", "model.safetensors"
# Largest member we unpack from a zip (a Swin-L checkpoint with optimizer state is about 3 GB).
MAX_ZIP_MEMBER_BYTES = 16 * 2**30


# --------------------------------------------------------------------------------------------------
# Payloads of our own formats


def _listify(obj: Any) -> Any:
    """Tuples -> lists, recursively: the config digests the same whether it went through JSON or torch."""
    if isinstance(obj, Mapping):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_listify(v) for v in obj]
    return obj


def weights_digest(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], extra: Mapping[str, Any],
                   version: int = WEIGHTS_FORMAT_VERSION) -> str:
    """The checksum of a weights file: format, version, config, tensors and extra together."""
    return tree_digest({"format": WEIGHTS_FORMAT, "format_version": version, "config": _listify(config),
                        "state_dict": state_dict, "extra": _listify(extra)})


def _legacy_tensor_digest(state: Mapping[str, Tensor]) -> str:
    """Checksum of format-version-1 files (tensors only). Read-only compatibility; never written."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_payload(model: torch.nn.Module, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dict :func:`focus_detr.save` writes for ``model`` (plain values and CPU tensors only)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = config_to_dict(model.cfg)  # type: ignore[attr-defined]
    extra = dict(extra or {})
    return {"format": WEIGHTS_FORMAT, "format_version": WEIGHTS_FORMAT_VERSION, "config": config,
            "state_dict": state, "extra": extra, "sha256": weights_digest(config, state, extra)}


def _check_state_dict(value: Any, source: str, field_name: str) -> dict[str, Tensor]:
    if not isinstance(value, Mapping):
        raise CheckpointFormatError(f"{source}: {field_name} must be a mapping of tensor names to tensors, "
                                    f"found {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointFormatError(f"{source}: {field_name} must map names to tensors, found "
                                        f"{type(k).__name__} -> {type(v).__name__}")
    return dict(value)


def _check_version(payload: Mapping[str, Any], source: str, newest: int) -> int:
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointFormatError(f"{source}: format_version must be an integer, found {version!r:.40}")
    if version > newest:
        raise CheckpointFormatError(f"{source}: format version {version} is newer than this focus-detr understands "
                                    f"({newest}); upgrade focus-detr")
    if version < 1:
        raise CheckpointFormatError(f"{source}: format_version {version} is not valid")
    return version


def check_weights_payload(payload: Any, source: str) -> tuple[FocusDETRConfig, dict[str, Tensor], dict[str, Any]]:
    """Structure, config bounds and checksum of a weights file's payload -> ``(config, state_dict, extra)``."""
    if not isinstance(payload, Mapping) or payload.get("format") != WEIGHTS_FORMAT:
        raise CheckpointFormatError(f"{source}: not a focus-detr weights file")
    version = _check_version(payload, source, WEIGHTS_FORMAT_VERSION)
    if "config" not in payload:
        raise CheckpointFormatError(f"{source}: the weights file has no config")
    cfg = config_from_file_dict(payload["config"], source)
    if "state_dict" not in payload:
        raise CheckpointFormatError(f"{source}: the weights file has no state_dict")
    state = _check_state_dict(payload["state_dict"], source, "state_dict")
    extra = payload.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise CheckpointFormatError(f"{source}: extra must be a mapping, found {type(extra).__name__}")
    stored = payload.get("sha256")
    if version == 1:
        ok = stored is None or _legacy_tensor_digest(state) == stored
    else:
        try:
            ok = isinstance(stored, str) and weights_digest(payload["config"], state, extra, version) == stored
        except TypeError as e:  # a value of a foreign type inside extra
            raise CheckpointFormatError(f"{source}: {e}") from None
    if not ok:
        raise CheckpointFormatError(f"{source}: checksum mismatch, the file is corrupted or was modified")
    return cfg, state, dict(extra)


def verify_training_checkpoint(payload: Any, source: str, verify: bool = True) -> dict[str, Any]:
    """Structure and checksum of a training checkpoint's payload (see :mod:`focus_detr.engine.checkpoint`)."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload.get("format") == WEIGHTS_FORMAT:
            hint = " It is a focus-detr weights file (model only): use it with `focus-detr eval` / `predict`."
        elif isinstance(payload, dict) and "model" in payload:
            hint = " It looks like a detectron2/detrex checkpoint: convert it with `focus-detr convert` first."
        raise CheckpointFormatError(f"{source}: not a focus-detr training checkpoint.{hint}")
    _check_version(payload, source, CHECKPOINT_FORMAT_VERSION)
    if verify:
        stored = payload.pop("sha256", None)
        try:
            ok = stored is not None and tree_digest(payload) == stored
        except TypeError as e:
            raise CheckpointFormatError(f"{source}: {e}") from None
        payload["sha256"] = stored
        if not ok:
            raise CheckpointFormatError(f"{source}: checksum mismatch, the checkpoint is corrupted")
    return payload


# --------------------------------------------------------------------------------------------------
# What a source is


@dataclass
class Source:
    """A resolved weights argument: its ``kind`` (one of :data:`KINDS`) and where it is."""

    kind: str
    text: str  # as given
    path: Path | None = None  # the file or folder (None for registry names / hub ids before download)
    payload: Any = None  # the torch payload when already read
    member: str | None = None  # zip: the checkpoint's name inside the archive


def _is_torch_zip(names: list[str]) -> bool:
    """torch.save files are zips too: ``<folder>/data.pkl`` + ``<folder>/data/...``."""
    return any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names)


_NOT_CHECKPOINTS = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$|[^/]*\.(txt|md|json|yaml|yml|py|log|cfg|ini|png|jpg)$)",
                              re.IGNORECASE)


def zip_checkpoint_member(path: Path) -> str:
    """The one checkpoint file inside a release zip; :class:`CheckpointFormatError` naming the contents when it
    holds none or several."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: a damaged zip archive ({type(e).__name__}: {e})") from None
    names = [i.filename for i in infos]
    candidates = [i for i in infos if not _NOT_CHECKPOINTS.search(i.filename)]
    listing = ", ".join(names[:10]) + (f" ... ({len(names)} files)" if len(names) > 10 else "")
    if not candidates:
        raise CheckpointFormatError(f"{path}: the zip holds no checkpoint file (contents: {listing or 'nothing'})")
    if len(candidates) > 1:
        raise CheckpointFormatError(f"{path}: the zip holds {len(candidates)} candidate checkpoint files, expected "
                                    f"one: {', '.join(i.filename for i in candidates[:10])}; unpack it and pass "
                                    "the one you mean")
    member = candidates[0]
    if member.file_size > MAX_ZIP_MEMBER_BYTES:
        raise CheckpointFormatError(f"{path}: {member.filename} claims {member.file_size} bytes, more than any "
                                    "checkpoint; refused")
    return member.filename


def unpack_zip_member(path: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` of zip ``path`` to the file ``dest`` (atomically), refusing more bytes than declared."""
    from .files import atomic_write

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)

        def write(f) -> None:
            copied = 0
            with z.open(info) as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    copied += len(block)
                    if copied > info.file_size:
                        raise CheckpointFormatError(f"{path}: {member} unpacks to more bytes than declared")
                    f.write(block)

        try:
            return atomic_write(dest, write)
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{path}: cannot unpack {member} ({type(e).__name__}: {e})") from None


def identify(text: str | os.PathLike[str]) -> Source:
    """Decide what kind of weights source ``text`` is (reads the file when it must)."""
    text = os.fspath(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / _HF_CONFIG).is_file() and (path / _HF_TENSORS).is_file():
            return Source("hf", text, path)
        if (path / "model_final.pth").is_file() or (path / "checkpoints").is_dir():
            raise CheckpointFormatError(f"{path}: a training run folder; pass RUN/model_final.pth (or a checkpoint "
                                        "in RUN/checkpoints/)")
        missing = [n for n in (_HF_CONFIG, _HF_TENSORS) if not (path / n).is_file()]
        raise CheckpointFormatError(f"{path}: a folder but not a Hugging Face model folder (no {', '.join(missing)})")
    if path.is_file():
        if path.suffix.lower() == ".pkl":
            return Source("official", text, path, payload=read_numpy_pickle(path))
        try:
            is_zip, names = zipfile.is_zipfile(path), []
            if is_zip:
                with zipfile.ZipFile(path) as z:
                    names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            is_zip, names = False, []
        if is_zip and not _is_torch_zip(names):
            return Source("zip", text, path, member=zip_checkpoint_member(path))
        payload = read_torch_file(path)
        return Source(_payload_kind(payload, path), text, path, payload=payload)
    from . import registry

    if registry.find(text) is not None:
        return Source("registry", text)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")) and not path.suffix:
        return Source("hub", text)
    close = difflib.get_close_matches(text, registry.names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "`focus-detr models` lists the names"
    raise CheckpointFormatError(f"{text}: no such weights file (no such file or folder, and not a pretrained model "
                                f"name; {hint})")


def _payload_kind(payload: Any, path: Path) -> str:
    if isinstance(payload, Mapping):
        fmt = payload.get("format")
        if fmt == WEIGHTS_FORMAT:
            return "weights"
        if fmt == CHECKPOINT_FORMAT:
            return "checkpoint"
        if isinstance(fmt, str) and fmt.startswith("focus-detr"):
            raise CheckpointFormatError(f"{path}: unknown focus-detr file format {fmt!r:.60}; upgrade focus-detr")
        state = payload.get("model", payload)
        if isinstance(state, Mapping) and any(isinstance(v, Tensor) for v in state.values()):
            return "official"
        raise CheckpointFormatError(f"{path}: a PyTorch file without model weights (keys: "
                                    f"{', '.join(str(k) for k in list(payload)[:8])})")
    raise CheckpointFormatError(f"{path}: a PyTorch file holding a {type(payload).__name__}, not model weights")


# --------------------------------------------------------------------------------------------------
# Official checkpoints: state dict and preset guess


def official_state_dict(payload: Any, source: str) -> dict[str, Tensor]:
    """``{"model": sd}`` / bare sd (tensors or numpy arrays) -> tensors, ``module.`` stripped."""
    import numpy as np

    state = payload.get("model", payload) if isinstance(payload, Mapping) else payload
    if not isinstance(state, Mapping):
        raise CheckpointFormatError(f"{source}: model must be a mapping of tensor names to tensors, found "
                                    f"{type(state).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                continue
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(key, str) and isinstance(value, Tensor):
            out[key[len("module."):] if key.startswith("module.") else key] = value
    if not out:
        raise CheckpointFormatError(f"{source}: holds no tensors (expected a detectron2 checkpoint with a 'model' "
                                    "state dict)")
    return out


@dataclass
class PresetGuess:
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def guess_preset(state: Mapping[str, Tensor]) -> PresetGuess | None:
    """The preset an official state dict fits, from its keys and shapes; None when unrecognisable.

    Position-embedding settings are not in checkpoints: a ResNet guess assumes the 24/36-epoch schedule (the
    released files with the best AP); 12-epoch files need ``--preset r50_4scale_12ep`` / ``r101_4scale_12ep``.
    """
    keys = list(state)
    overrides: dict[str, Any] = {}
    head = state.get("class_embed.0.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != 80:
        overrides["num_classes"] = int(head.shape[0])
    if "transformer.enc_mask_predictor.layer1.1.weight" not in state and any(k.startswith("transformer.") for k in keys):
        overrides["encoder_mode"] = "dense"  # a DINO checkpoint: no foreground score predictor
    res4 = {int(m.group(1)) for k in keys if (m := re.match(r"^backbone\.res4\.(\d+)\.", k))}
    if res4:
        blocks = max(res4) + 1
        depth = {6: 50, 23: 101}.get(blocks)
        if depth is None:
            return None
        preset = f"r{depth}_4scale"
        return PresetGuess(preset, overrides,
                           f"ResNet-{depth} backbone ({blocks} res4 blocks); position embedding of the 24/36-epoch "
                           f"schedule assumed, pass --preset {preset}_12ep for a 12-epoch checkpoint")
    patch = state.get("backbone.patch_embed.proj.weight")
    if patch is not None:
        width = int(patch.shape[0])
        stage3 = {int(m.group(1)) for k in keys if (m := re.match(r"^backbone\.layers\.2\.blocks\.(\d+)\.", k))}
        blocks = max(stage3) + 1 if stage3 else 0
        table = state.get("backbone.layers.0.blocks.0.attn.relative_position_bias_table")
        window = int(round(((table.shape[0]) ** 0.5 + 1) / 2)) if table is not None else 0
        for name in ("swin_tiny_224_4scale", "swin_small_224_4scale", "swin_base_384_4scale", "swin_large_384_4scale"):
            b = PRESETS[name].backbone
            if b.embed_dim == width and b.depths[2] == blocks and (not window or b.window_size == window):  # type: ignore[union-attr]
                return PresetGuess(name, overrides, f"Swin backbone of width {width}, {blocks} blocks in stage 3, "
                                                    f"window {window}")
    return None


# --------------------------------------------------------------------------------------------------
# Reading any source into (config, our state dict)


@dataclass
class ReadWeights:
    """What :func:`read_weights` found: the config to build, the state dict in our names, and how it got them."""

    kind: str
    path: Path | None
    cfg: FocusDETRConfig
    state_dict: dict[str, Tensor]
    description: str
    extra: dict[str, Any] = field(default_factory=dict)
    report: ConversionReport | None = None
    info: dict[str, Any] = field(default_factory=dict)  # kind-specific facts for `focus-detr info`


def read_weights(source: str | os.PathLike[str] | Source, preset: str | FocusDETRConfig | None = None,
                 ema: bool = False, overrides: Mapping[str, Any] | None = None,
                 progress: bool = True) -> ReadWeights:
    """Any weights source -> :class:`ReadWeights`. ``preset`` is needed (or guessed) for official checkpoints
    only; ``ema`` takes a training checkpoint's EMA weights; ``overrides`` change run-time config fields."""
    src = source if isinstance(source, Source) else identify(source)
    overrides = dict(overrides or {})
    if src.kind != "checkpoint" and ema:
        raise CheckpointFormatError(f"{src.text}: --ema applies to training checkpoints; this is a "
                                    f"{KIND_NAMES[src.kind]} (EMA weights of a run: RUN/model_final_ema.pth)")
    if src.kind == "weights":
        assert src.path is not None
        cfg, state, extra = check_weights_payload(src.payload, str(src.path))
        check_size(cfg, state, str(src.path))
        note = f" (--preset {preset} ignored: the file stores its config)" if isinstance(preset, str) else ""
        return ReadWeights("weights", src.path, _with(cfg, overrides, src.path), state,
                           f"weights file {src.path}{note}", extra,
                           info={"format_version": src.payload.get("format_version"),
                                 "sha256": src.payload.get("sha256")})
    if src.kind == "checkpoint":
        assert src.path is not None
        payload = verify_training_checkpoint(src.payload, str(src.path))
        cfg = config_from_file_dict(payload.get("model_config"), str(src.path))
        state = _check_state_dict(payload.get("model"), str(src.path), "model")
        what = "raw"
        if ema:
            if payload.get("ema") is None:
                raise CheckpointFormatError(f"{src.path}: holds no EMA weights (the run was trained without --ema)")
            ema_state = _check_state_dict(payload["ema"], str(src.path), "ema")
            state = {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}
            what = "EMA"
        check_size(cfg, state, str(src.path))
        it = payload.get("iteration")
        return ReadWeights("checkpoint", src.path, _with(cfg, overrides, src.path), state,
                           f"training checkpoint {src.path} (iteration {it}, {what} weights)",
                           info={"iteration": it, "has_ema": payload.get("ema") is not None, "weights": what})
    if src.kind == "official":
        assert src.path is not None
        return read_official(official_state_dict(src.payload, str(src.path)), str(src.path), preset, overrides,
                              "official checkpoint")
    if src.kind == "zip":
        assert src.path is not None and src.member is not None
        with tempfile.TemporaryDirectory(prefix="focus-detr-zip-") as tmp:
            inner = unpack_zip_member(src.path, src.member, Path(tmp) / Path(src.member).name)
            inner_src = identify(inner)
            if inner_src.kind not in ("weights", "checkpoint", "official"):
                raise CheckpointFormatError(f"{src.path}: {src.member} is a {KIND_NAMES[inner_src.kind]}")
            result = read_weights(inner_src, preset, ema, overrides)
        result.description = f"{src.member} from zip {src.path}: {result.description.replace(str(inner), src.member)}"
        result.info = {"member": src.member, "inner_kind": result.kind, **result.info}
        result.kind, result.path = "zip", src.path
        return result
    if src.kind == "hf":
        from .hf import read_hf_folder

        assert src.path is not None
        cfg, state, extra = read_hf_folder(src.path)
        check_size(cfg, state, str(src.path))
        return ReadWeights("hf", src.path, _with(cfg, overrides, src.path), state,
                           f"Hugging Face folder {src.path}", extra)
    if src.kind == "registry":
        from . import registry

        path = registry.fetch(src.text, progress=progress)
        result = read_weights(path, None, False, overrides)
        result.kind, result.description = "registry", f"pretrained {src.text} ({result.description})"
        result.info = {"name": src.text, "cached_file": str(path), **result.info}
        return result
    if src.kind == "hub":
        from .hf import download_hub_folder

        folder = download_hub_folder(src.text)
        result = read_weights(folder, None, False, overrides)
        result.kind, result.description = "hub", f"Hugging Face Hub {src.text} ({folder})"
        return result
    raise CheckpointFormatError(f"{src.text}: unknown kind {src.kind}")  # pragma: no cover


def _with(cfg: FocusDETRConfig, overrides: Mapping[str, Any], path: Path | None) -> FocusDETRConfig:
    if not overrides:
        return cfg
    try:
        return make_config(cfg, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: {e}") from None


def read_official(state: dict[str, Tensor], source: str, preset: str | FocusDETRConfig | None,
                   overrides: Mapping[str, Any], what: str) -> ReadWeights:
    guess_note = ""
    overrides = dict(overrides)
    if preset is None:
        guess = guess_preset(state)
        if guess is None:
            raise CheckpointFormatError(
                f"{source}: an {what} whose architecture is not recognisable from its keys; pass --preset NAME "
                f"(in Python: focus_detr.load_official(path, preset)); presets: {', '.join(sorted(PRESETS))}")
        preset = guess.preset
        overrides = {**guess.overrides, **overrides}
        guess_note = f", preset {preset!r} guessed: {guess.reason}"
    try:
        cfg = make_config(preset, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{source}: {str(e).strip(chr(39))}") from None
    converted, report = convert_official_state_dict(state, cfg)
    label = preset if isinstance(preset, str) else "the given config"
    return ReadWeights("official", Path(source), cfg, converted,
                       f"{what} {source} (preset {label!r}{guess_note})", report=report,
                       info={"preset": label, "guessed": bool(guess_note), "num_keys": len(state)})


# --------------------------------------------------------------------------------------------------
# Building a model for a state dict


def build_for_state_dict(cfg: FocusDETRConfig, state_dict: Mapping[str, Tensor], source: str,
                         report: ConversionReport | None = None):
    """Build ``cfg`` and load ``state_dict`` strictly; a misfit is one line naming missing / unexpected /
    mis-shaped keys. (Configs read from files were size-checked against their tensors by :func:`read_weights`.)"""
    from ..model import build_model

    model = build_model(cfg)
    problems = _shape_problems(model.state_dict(), state_dict, report)
    if problems:  # the same facts as load_converted's report, on one line
        raise CheckpointMismatchError(f"{source} does not fit the model ({type(cfg.backbone).__name__}, encoder mode "
                                      f"{cfg.encoder.mode!r}, {cfg.num_classes} classes): {problems} (is the preset "
                                      "right? e.g. r50 vs r101, swin size, num_classes)")
    load_converted(model, state_dict, report, source=source)
    return model.eval()


def _shape_problems(own: Mapping[str, Tensor], state: Mapping[str, Tensor], report: ConversionReport | None) -> str:
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    if report is not None:
        inverse = {v: k for k, v in report.converted.items()}
        unexpected = [inverse.get(k, k) for k in unexpected] + [f"{k} (no conversion rule)" for k in report.unconverted]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shape)):
        if items:
            parts.append(f"{len(items)} {label} ({', '.join(items[:5])}{' ...' if len(items) > 5 else ''})")
    return "; ".join(parts)


def load_model(source: str | os.PathLike[str], preset: str | FocusDETRConfig | None = None, ema: bool = False,
               device: str | torch.device = "cpu", progress: bool = True, **overrides: Any):
    """``(model, description)`` for any weights source (see the module docstring for the kinds)."""
    from ..devices import resolve_device

    dev = resolve_device(device)  # "auto"; a device this machine lacks fails before the file is read
    read = read_weights(source, preset, ema, overrides, progress=progress)
    model = build_for_state_dict(read.cfg, read.state_dict, str(read.path or source), read.report)
    return model.to(dev).eval(), read.description


def read_state_dict(source: str | os.PathLike[str], preset: str | FocusDETRConfig | None = None,
                    ema: bool = False) -> dict[str, Tensor]:
    """The weights of any source in our names (no model built), e.g. to initialise a fine-tuning run."""
    return read_weights(source, preset, ema).state_dict


def save_weights(model: torch.nn.Module, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as our weights file, atomically (see :func:`weights_payload`)."""
    from .files import atomic_torch_save

    return atomic_torch_save(weights_payload(model, extra), path)


__all__ = ["WEIGHTS_FORMAT", "WEIGHTS_FORMAT_VERSION", "CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "KINDS",
           "KIND_NAMES", "Source", "identify", "ReadWeights", "read_weights", "read_state_dict", "load_model",
           "build_for_state_dict", "guess_preset", "PresetGuess", "weights_payload", "weights_digest",
           "check_weights_payload", "verify_training_checkpoint", "save_weights", "zip_checkpoint_member",
           "unpack_zip_member", "official_state_dict"]
