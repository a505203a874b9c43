"""An inference-only copy of a detector: folded FrozenBN, weights cast once, float32 where precision matters.

:func:`optimize_for_inference` is the convention RF-DETR uses (optimise once, then call ``predict`` as
before); here it returns a new model and leaves the one passed in untouched::

    model = focus_detr.load("weights.pt")
    fast = focus_detr.optimize_for_inference(model, precision="bf16")
    detections = fast.predict("photo.jpg")

What it does, in order:

1. ``copy.deepcopy`` the model, ``eval()``, no gradients.
2. Folds every backbone :class:`~focus_detr.layers.frozen_bn.FrozenBatchNorm2d` into the convolution before it
   (:meth:`~focus_detr.backbones.resnet.Conv2dNorm.fold_norm`): one op instead of two, exact up to float
   rounding. GroupNorm (the ``tiny`` preset, ``norm="gn"``) and LayerNorm cannot be folded and stay.
3. ``channels_last``: the backbone's convolution weights in NHWC (oneDNN's native layout; PyTorch then keeps
   the activations NHWC too). Default on for CPU: with folding it took R50 at 800x1333, one thread, from 7.75
   to 6.97 CPU seconds (0.55 -> 0.61 of the fp32 matmul peak; ``benchmarks/bench_precision.py``, RESULTS.md).
4. ``bf16`` / ``fp16``: the weights of the matrix-multiply layers (``nn.Linear``, ``nn.Conv2d``,
   ``nn.MultiheadAttention``) are cast once, and ``forward`` runs under ``torch.autocast`` so the float32
   tensors the detector builds itself (position embeddings, reference points, proposals) meet them in the
   low precision. Kept in float32 (weights and computation, autocast off): the modules whose outputs are
   ranked or are coordinates, see :data:`FLOAT32_MODULES` (token score head, proposal and detection class /
   box heads); the deformable sampling core (the layer turns autocast off around it and casts its inputs,
   :func:`~focus_detr.layers.deformable_attention.sampling_autocast_off`); norms, embeddings and every
   element-wise op follow autocast's rules (LayerNorm / GroupNorm weights stay float32).

Precision support (decided, see ``docs/usage.md``):

* ``fp32``: every device.
* ``bf16``: CPU and CUDA. On a CPU without bfloat16 matrix units (AVX2 only; AVX-512-BF16 / AMX have them)
  PyTorch emulates bf16 matmuls and it is *slower* than fp32 -- a warning says so; it is for machines that
  have the units, and for GPUs.
* ``fp16``: CUDA only. PyTorch's CPU float16 matrix products have no fast kernels on most CPUs; on a CPU this
  is refused with a one-line :class:`PrecisionError` (use bf16 or fp32).

The returned model is **inference only**: ``train()`` raises, training targets are refused, and it cannot be
written as a weights file (``focus_detr.save`` / ``save_pretrained`` raise): its state dict holds folded and
cast tensors that no longer match the architecture's checkpoint layout. Save the original model and optimise
after loading; ``state_dict()`` still works for inspection.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.resnet import Conv2dNorm
from ..ops.images import ImageBatch
from .detector import FocusDETR
from .outputs import FocusDETROutputs
from .selection import SelectionPolicy

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Submodules (names relative to the detector) kept in float32 in bf16/fp16 models. Their outputs are ranked by
# top-k (foreground scores, OESM / proposal class scores, the final detection scores) or are box coordinates
# refined layer after layer: a bfloat16 output has 8 significant bits, so scores closer than 1/256 of their
# size would tie or swap, and a box coordinate near 1 would move by up to 1/256 of the image. Together they cost
# a few percent of the FLOPs (the score head's MLP, 1-3 small linear layers per head).
FLOAT32_MODULES: tuple[str, ...] = ("foreground_selector.score_net.head", "proposal_class_head",
                                    "proposal_box_head", "class_heads", "box_heads")


class PrecisionError(ValueError):
    """A precision this model / device cannot run (one-line message)."""


class InferenceOnlyError(RuntimeError):
    """Training or saving an optimised (inference-only) model."""


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise :class:`PrecisionError` if ``precision`` is unknown or not supported on ``device``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise PrecisionError(f"precision fp16 needs a CUDA device (PyTorch's {kind} float16 matrix products are "
                             f"slow or missing); use bf16 or fp32 on {kind}")
    if precision == "bf16" and kind not in ("cpu", "cuda"):
        raise PrecisionError(f"precision bf16 is supported on cpu and cuda, not {kind}; use fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("precision bf16: this CUDA device has no bfloat16 support; use fp16 or fp32")


def cpu_has_bf16_units() -> bool:
    """True if PyTorch's CPU kernels can use bfloat16 matrix instructions (AVX-512-BF16 or AMX)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or _cpu_flags_have_bf16()


def _cpu_flags_have_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


class _Float32Forward:
    """Mixin put in front of a module's class: its forward runs in float32 with autocast off."""

    def forward(self, *inputs: Any) -> Any:
        tensors = [t for t in inputs if isinstance(t, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        cast = tuple(t.float() if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)
        with torch.autocast(device_type, enabled=False):
            return super().forward(*cast)  # type: ignore[misc]


_FLOAT32_CLASSES: dict[type, type] = {}


def _float32_class(cls: type) -> type:
    """``Float32<cls>``: a subclass of ``cls`` whose forward runs in float32 (module-level, so it pickles)."""
    if issubclass(cls, _Float32Forward):
        return cls
    if cls not in _FLOAT32_CLASSES:
        name = f"Float32{cls.__name__}"
        new = type(name, (_Float32Forward, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _FLOAT32_CLASSES[cls] = new
    return _FLOAT32_CLASSES[cls]


def keep_in_float32(module: nn.Module) -> None:
    """Make ``module`` (and everything under it) compute in float32 with autocast off, in place.

    The class is swapped for a ``Float32<Class>`` subclass rather than wrapped, so parameter names stay.
    """
    module.float()
    module.__class__ = _float32_class(type(module))


def keep_heads_in_float32(model: FocusDETR) -> FocusDETR:
    """Make the modules of :data:`FLOAT32_MODULES` compute in float32 with autocast off, in place; returns
    ``model``. The mixed-precision policy for autocast users (AMP training or inference without
    :func:`optimize_for_inference`): token scores, the scores every top-k ranks and the box coordinates stay
    float32 while the rest runs in the autocast dtype. Parameters keep their names and stay trainable."""
    for name in FLOAT32_MODULES:
        submodule = _find(model, name)
        if submodule is None:
            continue
        for target in (list(submodule) if isinstance(submodule, nn.ModuleList) else [submodule]):
            keep_in_float32(target)
    return model


class InferenceFocusDETR(FocusDETR):
    """A :class:`FocusDETR` made by :func:`optimize_for_inference`: same ``forward`` / ``detect`` / ``predict``,
    run in :attr:`inference_precision`; inference only.

    Outputs: ``main`` / ``aux`` / ``encoder_proposals`` logits and boxes are float32 in every precision
    (their heads are float32 modules); other fields (``memory``) may be in the compute dtype.
    """

    inference_precision: str = "fp32"
    channels_last: bool = False
    folded_norms: int = 0

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.inference_precision]

    def precision_context(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in the compute dtype (bf16 / fp16), nothing for fp32."""
        if self.inference_precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def forward(self, batch: ImageBatch, targets: list[dict[str, Tensor]] | None = None,
                policy: SelectionPolicy | None = None) -> FocusDETROutputs:
        if targets is not None:
            raise InferenceOnlyError("this model was optimised for inference (optimize_for_inference): it takes no "
                                     "training targets; train the original model")
        if not isinstance(batch, ImageBatch):
            return super().forward(batch, None, policy)  # images: predict(), which calls back with a batch
        if self.channels_last:
            batch = ImageBatch(batch.tensor.contiguous(memory_format=torch.channels_last), batch.padding_mask,
                               batch.image_sizes)
        with torch.no_grad(), self.precision_context():
            return super().forward(batch, None, policy)

    def train(self, mode: bool = True) -> InferenceFocusDETR:
        if mode:
            raise InferenceOnlyError("this model was optimised for inference (optimize_for_inference) and cannot "
                                     "be trained: train the original model")
        return super().train(False)

    def save_pretrained(self, folder: str, extra: dict | None = None):
        raise InferenceOnlyError(NO_SAVE_MESSAGE)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        raise InferenceOnlyError(NO_SAVE_MESSAGE)

    def extra_repr(self) -> str:
        return (f"inference only: precision={self.inference_precision}, channels_last={self.channels_last}, "
                f"folded_norms={self.folded_norms}")


NO_SAVE_MESSAGE = ("an optimised model (optimize_for_inference) holds folded and cast weights that are not a weights file: "
            "save the original model and optimise it again after loading")


def fold_frozen_batch_norms(model: nn.Module) -> int:
    """Fold every FrozenBN that follows a convolution (:class:`Conv2dNorm`) into it, in place; returns how many."""
    return sum(module.fold_norm() for module in model.modules() if isinstance(module, Conv2dNorm))


def optimize_for_inference(model: FocusDETR, precision: str = "fp32", channels_last: bool | None = None,
                           fold_norms: bool = True) -> InferenceFocusDETR:
    """An inference-only copy of ``model`` in ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``); see the
    module docstring for what changes and what stays float32.

    Args:
        model:         a :class:`FocusDETR` (left unchanged; optimise on the device you will run on).
        precision:     compute precision; raises :class:`PrecisionError` for one the device does not support.
        channels_last: NHWC backbone convolutions (default: on for CPU, off elsewhere).
        fold_norms:    fold FrozenBN into the convolutions (default on; off only to measure its effect).
    Returns:
        an :class:`InferenceFocusDETR` with the same ``predict`` / ``detect`` / ``forward``.
    """
    if isinstance(model, InferenceFocusDETR):
        raise ValueError("the model is already optimised for inference; optimise the original model instead")
    if not isinstance(model, FocusDETR):
        raise TypeError(f"optimize_for_inference takes a FocusDETR, got {type(model).__name__}")
    device = model.device
    check_precision(precision, device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        warnings.warn("precision bf16 on a CPU without bfloat16 matrix units (no AVX-512-BF16 / AMX): PyTorch "
                      "emulates it and it runs slower than fp32", stacklevel=2)
    optimized = copy.deepcopy(model)
    optimized.stage_callback = None
    optimized.eval()
    optimized.requires_grad_(False)
    folded = fold_frozen_batch_norms(optimized) if fold_norms else 0
    use_channels_last = device.type == "cpu" if channels_last is None else channels_last
    if use_channels_last:
        for module in optimized.backbone.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    if precision != "fp32":
        dtype = COMPUTE_DTYPES[precision]
        for module in optimized.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
        keep_heads_in_float32(optimized)
    optimized.__class__ = InferenceFocusDETR
    optimized.inference_precision = precision
    optimized.channels_last = use_channels_last
    optimized.folded_norms = folded
    return optimized  # type: ignore[return-value]


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # e.g. no foreground selector in dense mode
        return None


def is_inference_only(model: nn.Module) -> bool:
    """True for a model returned by :func:`optimize_for_inference`."""
    return isinstance(model, InferenceFocusDETR)


__all__ = ["optimize_for_inference", "InferenceFocusDETR", "PrecisionError", "InferenceOnlyError", "PRECISIONS",
           "COMPUTE_DTYPES", "FLOAT32_MODULES", "check_precision", "cpu_has_bf16_units", "fold_frozen_batch_norms",
           "keep_in_float32", "keep_heads_in_float32", "is_inference_only"]
