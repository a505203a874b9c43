"""``focus-detr app``: a local web page to try a model in the browser (needs the ``app`` extra: Gradio).

Upload, paste or fetch a picture (or pick an example), see the detections with a score-threshold slider, a
table of them (downloadable as COCO results json), the encoder keep ratio with the tokens kept and the measured
time, and the focus maps (foreground score per level, tokens kept per encoder layer, OESM tokens).

* :mod:`focus_detr.app.core`: reading inputs, running the model once per image, drawing (no web code; tested
  directly);
* :mod:`focus_detr.app.ui`: the Gradio page (imported only when the app starts: Gradio is optional).

From Python::

    from focus_detr.app import serve
    serve("runs/demo/model_final.pth", host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .core import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, Analysis, UploadError, analyse

if TYPE_CHECKING:  # pragma: no cover
    from ..model import FocusDETR

#: Offered in the page when the app starts without weights (relative to the working folder).
DEMO_WEIGHTS = Path("runs/demo/model_final.pth")


def serve(weights: "str | os.PathLike[str] | FocusDETR | None" = None, host: str = "127.0.0.1", port: int = 7860,
          device: str = "auto", quiet: bool = False, description: str | None = None,
          allow_private_urls: bool = False) -> None:
    """Serve the page on ``host:port`` until interrupted (Ctrl-C).

    ``weights``: a loaded model, or any weights source :func:`focus_detr.inference.load_model` reads (file,
    training checkpoint, official checkpoint, Hugging Face folder, pretrained name), loaded on ``device``; None:
    the page says how to get weights and offers ``runs/demo/model_final.pth`` when it exists. ``description``
    names a loaded model's weights in the page. Needs the ``app`` extra (Gradio).

    On a ``host`` other machines can reach (not loopback), the page's URL box fetches public addresses only,
    so visitors cannot make this machine read its private networks; ``allow_private_urls`` lifts that.
    """
    import shutil

    from ..data.url_io import is_loopback_host
    from ..inference import load_model
    from ..model import FocusDETR
    from . import core, ui

    slot = ui.ModelSlot(demo_weights=DEMO_WEIGHTS if DEMO_WEIGHTS.is_file() else None)
    if isinstance(weights, FocusDETR):
        slot.model, slot.description = weights.eval(), description or "a model given in Python"
    elif weights is not None:
        slot.model, slot.description = load_model(weights, device=device)
    work = core.new_work_folder()
    try:
        public_urls_only = not (is_loopback_host(host) or allow_private_urls)
        app = ui.build_app(slot, core.example_images(work), lambda p: load_model(p, device=device), work,
                           public_urls_only)
        ui.launch(app, host, port, work, quiet=quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["serve", "analyse", "Analysis", "UploadError", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "DEMO_WEIGHTS"]
