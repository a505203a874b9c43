"""The Hugging Face layout: a folder with ``config.json`` (our model config) and ``model.safetensors``.

``safetensors`` (optional extra ``hf``) stores tensors with no pickle at all; the checksum of config and
tensors together (:func:`focus_detr.weights.kinds.weights_digest`) is kept in the safetensors header's
metadata, so an edited ``config.json`` or damaged tensor file is refused. ``huggingface_hub`` (optional extra
``hub``) adds loading a Hub repo id and :func:`push_to_hub`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import FocusDETRConfig, config_to_dict
from .files import CheckpointFormatError, atomic_write_bytes
from .validate import config_from_file_dict

CONFIG_NAME, TENSORS_NAME = "config.json", "model.safetensors"
HF_FORMAT = "focus-detr-hf"
HF_FORMAT_VERSION = 1
_MAX_CONFIG_BYTES = 16 * 2**20


def _safetensors(what: str):
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save
    except ImportError:
        raise CheckpointFormatError(f"{what} needs the optional package safetensors: pip install 'focus-detr[hf]'") from None
    return safe_open, save


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike[str],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (each atomically); returns the folder."""
    from .. import __version__
    from .kinds import weights_digest

    _, save = _safetensors("save_pretrained")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_to_dict(model.cfg)  # type: ignore[attr-defined]
    extra = dict(extra or {})
    # Clones: safetensors refuses tensors that share memory (tied heads), and wants them contiguous.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    digest = weights_digest(config, state, extra)
    atomic_write_bytes(folder / TENSORS_NAME, save(state, metadata={"format": "pt", "focus_detr_sha256": digest}))
    document = {"model_type": "focus-detr", "format": HF_FORMAT, "format_version": HF_FORMAT_VERSION,
                "focus_detr_version": __version__, "config": config, "extra": extra}
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(document, indent=1) + "\n").encode())
    return folder


def read_hf_folder(folder: str | os.PathLike[str]) -> tuple[FocusDETRConfig, dict[str, Tensor], dict[str, Any]]:
    """``(config, state_dict, extra)`` of a folder written by :func:`save_pretrained`; one-line errors."""
    from .kinds import weights_digest

    folder = Path(folder)
    config_file, tensors_file = folder / CONFIG_NAME, folder / TENSORS_NAME
    try:
        if config_file.stat().st_size > _MAX_CONFIG_BYTES:
            raise CheckpointFormatError(f"{config_file}: too large for a model config")
        document = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{config_file}: not a readable JSON config ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(document, dict) or document.get("format") != HF_FORMAT:
        raise CheckpointFormatError(f"{config_file}: not a focus-detr config (expected \"format\": \"{HF_FORMAT}\"); "
                                    "other libraries' Hugging Face models cannot be loaded")
    version = document.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= HF_FORMAT_VERSION:
        raise CheckpointFormatError(f"{config_file}: format_version {version!r:.40} is not one this focus-detr "
                                    f"reads (1..{HF_FORMAT_VERSION})")
    cfg = config_from_file_dict(document.get("config"), str(config_file))
    extra = document.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointFormatError(f"{config_file}: extra must be a mapping")
    safe_open, _ = _safetensors(f"{tensors_file}")
    try:
        with safe_open(str(tensors_file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers / files
        raise CheckpointFormatError(f"{tensors_file}: not a readable safetensors file, it is truncated or damaged "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    stored = metadata.get("focus_detr_sha256")
    if stored != weights_digest(document["config"], state, extra):
        raise CheckpointFormatError(f"{folder}: checksum mismatch between {CONFIG_NAME} and {TENSORS_NAME}; one of "
                                    "them is damaged or was edited")
    return cfg, state, extra


def _hub(what: str):
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointFormatError(f"{what} needs the optional package huggingface_hub: pip install "
                                    "'focus-detr[hub]'") from None
    return huggingface_hub


def download_hub_folder(repo_id: str, revision: str | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` of Hub repo ``repo_id`` in the Hugging Face cache."""
    hub = _hub(f"{repo_id}: not a file, folder or pretrained name; loading it as a Hugging Face Hub repo id")
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, TENSORS_NAME])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: one line
        raise CheckpointFormatError(f"{repo_id}: cannot fetch from the Hugging Face Hub ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return Path(folder)


def push_to_hub(model: torch.nn.Module, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload focus-detr model") -> str:
    """Upload ``model`` in the Hugging Face layout to Hub repo ``repo_id`` (created if needed); returns its URL."""
    hub = _hub("push_to_hub")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="focus-detr-hub-") as tmp:
        save_pretrained(model, tmp)
        api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return f"https://huggingface.co/{repo_id}"


__all__ = ["save_pretrained", "read_hf_folder", "download_hub_folder", "push_to_hub", "CONFIG_NAME", "TENSORS_NAME"]
