"""The web page of ``focus-detr app`` (Gradio Blocks): :mod:`focus_detr.app.core` wired to components.

One model is shared by every browser tab; every event that runs it is in one concurrency group of size one
(``concurrency_id="model"``), so requests are served one at a time, in order, from Gradio's queue. The keep
ratio is a setting of that shared model, set by each request before it runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from . import core
from .core import Analysis, UploadError

#: Requests waiting in the queue beyond this many are refused with Gradio's "queue is full" message.
QUEUE_SIZE: int = 16

_CSS = """
#picture img, #kept img, #oesm img { width: 100%; height: 100%; object-fit: contain; }
#message.error { border-left: 4px solid #d62728; background: #fdecea; padding: 0.4em 0.8em; }
#message.info { border-left: 4px solid #1f77b4; background: #eaf2fb; padding: 0.4em 0.8em; }
"""


@dataclass
class ModelSlot:
    """The model the page runs (None until one is loaded) and where its weights came from."""

    model: Any = None
    description: str = ""
    demo_weights: Path | None = None  # offered with a button when no model was given
    lock: threading.Lock = field(default_factory=threading.Lock)


def no_model_text(demo_weights: Path | None) -> str:
    """What to do when the app was started without weights."""
    text = ("**No model loaded.** Start the app with weights: `focus-detr app WEIGHTS`, where WEIGHTS is a "
            "pretrained name (`focus-detr models` lists them), a weights file, a training checkpoint, an "
            "official checkpoint or a Hugging Face folder. No weights yet? `focus-detr demo` trains a small model "
            "on synthetic shapes in about 15 minutes on a CPU (then `focus-detr app runs/demo/model_final.pth`); "
            "`focus-detr app --preset tiny --random-init` shows the page with random weights (meaningless boxes).")
    if demo_weights is not None:
        text += f"\n\nA demo-trained model is here: **{demo_weights}**. Load it with the button below."
    return text


def build_app(slot: ModelSlot, examples: list[core.Example], load_weights: Callable[[Path], tuple[Any, str]],
              work: Path, public_urls_only: bool = False) -> gr.Blocks:
    """The page. ``load_weights(path)`` returns ``(model, description)`` (used by the demo-model button);
    ``work`` is a private folder for the json downloads (the caller removes it); ``public_urls_only``: the URL
    box refuses loopback, private and link-local hosts."""
    model = slot.model
    num_layers = model.cfg.encoder.num_layers if model is not None else 6
    keep_default = model.cfg.encoder.keep_ratio if model is not None else 0.5
    tokens_selectable = model is None or core.selects_tokens(model)

    with gr.Blocks(title="Focus-DETR", analytics_enabled=False) as app:
        gr.Markdown("# Focus-DETR: what the detector finds, and where its encoder looks")
        model_line = gr.Markdown(_model_line(slot), elem_id="model-line")
        with gr.Row(visible=model is None) as no_model_row:
            with gr.Column():
                gr.Markdown(no_model_text(slot.demo_weights), elem_id="no-model")
                demo_button = gr.Button(f"Load the demo-trained model ({slot.demo_weights})", variant="primary",
                                        visible=slot.demo_weights is not None, elem_id="load-demo")
        with gr.Row():
            with gr.Column(scale=2):
                image_in = _RawImage(sources=["upload", "clipboard"], type="filepath", elem_id="image-in",
                                     label=f"Image: upload, drop or paste (at most {core.MAX_UPLOAD_BYTES // 2**20} MB, "
                                           f"{core.MAX_UPLOAD_PIXELS // 10**6} M pixels)")
                with gr.Row():
                    url_in = gr.Textbox(label="or an image URL", placeholder="https://...", scale=4, elem_id="url-in")
                    url_button = gr.Button("Fetch", scale=1, elem_id="url-fetch")
                if examples:
                    gr.Examples([[str(e.path)] for e in examples], inputs=[image_in],
                                example_labels=[e.label for e in examples], label="Examples", examples_per_page=12)
                threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold", elem_id="threshold",
                                      info="Show detections at least this confident (no new model run).")
                keep_ratio = gr.Slider(0.05, 1.0, value=keep_default, step=0.05, label="Keep ratio",
                                       elem_id="keep-ratio", interactive=tokens_selectable,
                                       info="Share of tokens the encoder updates: lower is faster, and at some "
                                            "point less accurate (runs the model again)." if tokens_selectable
                                       else "This model's encoder is dense: it updates every token.")
            with gr.Column(scale=3):
                message = gr.Markdown("", elem_id="message", visible=False)
                with gr.Tabs():
                    with gr.Tab("Detections", id="detections"):
                        picture = gr.Image(label="Detections", type="pil", interactive=False, elem_id="picture",
                                           format="png", height=440)
                        summary = gr.Markdown("", elem_id="summary")
                        table = gr.Dataframe(headers=list(core.TABLE_HEADERS), label="Detections (original pixels)",
                                             interactive=False, elem_id="table", max_height=360)
                        coco_file = gr.File(label="Download as COCO results json", interactive=False,
                                            elem_id="coco-json")
                    with gr.Tab("Focus maps", id="focus"):
                        gr.Markdown("### Foreground score per feature level\n" + core.FOREGROUND_CAPTION,
                                    elem_id="caption-foreground")
                        levels = gr.Gallery(label="Foreground score", columns=4, height=240, object_fit="contain",
                                            elem_id="foreground", allow_preview=False)
                        layer = gr.Slider(1, num_layers, value=1, step=1, label="Encoder layer", elem_id="layer")
                        gr.Markdown("### Tokens kept by this layer\n" + core.KEPT_CAPTION, elem_id="caption-kept")
                        kept_picture = gr.Image(label="Tokens kept", type="pil", interactive=False, elem_id="kept",
                                                format="png", height=400)
                        kept_note = gr.Markdown("", elem_id="kept-note")
                        gr.Markdown("### Object-enhanced self-attention (OESM) tokens\n" + core.OESM_CAPTION,
                                    elem_id="caption-oesm")
                        oesm_picture = gr.Image(label="OESM tokens", type="pil", interactive=False, elem_id="oesm",
                                                format="png", height=400)
                        oesm_note = gr.Markdown("", elem_id="oesm-note")
        state = gr.State(None)

        # A model run sets the analysis (and what does not depend on the sliders); the threshold and layer views
        # are drawn by the handlers those sliders use, chained after every run with `.then`, so they always
        # read the sliders' current values (a slider moved while the model runs is never overwritten).
        results = [state, message, levels, layer]
        threshold_views = [picture, summary, table, coco_file]
        layer_views = [kept_picture, kept_note, oesm_picture, oesm_note]

        def show(analysis: Analysis | None, error: str | None = None) -> list[Any]:
            if analysis is None:
                return [None, _message(error, "error") if error else gr.update(value="", visible=False), [],
                        gr.update()]
            return [analysis, gr.update(value="", visible=False),
                    [(im, caption) for im, caption in core.foreground_maps(analysis)],
                    gr.update(maximum=max(analysis.num_layers, 1))]

        def run(image: Any, name: str, keep: float) -> list[Any]:
            if slot.model is None:
                return show(None, error=_no_model_message(slot))
            with slot.lock:
                analysis = core.analyse(slot.model, image, keep, name=name)
            return show(analysis)

        def on_image(upload: Any, keep: float) -> list[Any]:
            if upload is None:
                return show(None)
            try:
                path, name = upload
                image = core.read_upload(path, name)
            except UploadError as e:
                return show(None, error=str(e))
            return run(image, name, keep)

        def on_url(url: str, keep: float) -> list[Any]:
            try:
                image, name = core.read_url(url, public_only=public_urls_only)
            except UploadError as e:
                return show(None, error=str(e))
            return run(image, name, keep)

        def on_keep_ratio(analysis: Analysis | None, keep: float) -> list[Any]:
            if analysis is None:
                return [gr.update()] * len(results)
            return run(analysis.image, analysis.name, keep)

        def on_threshold(analysis: Analysis | None, threshold_value: float) -> list[Any]:
            if analysis is None:
                return [None, "", _empty_table(), None]
            return [core.draw(analysis, threshold_value), core.summary_markdown(analysis, threshold_value),
                    _table(analysis, threshold_value), str(core.write_coco_json(analysis, threshold_value, work))]

        def on_layer(analysis: Analysis | None, layer_value: int) -> list[Any]:
            if analysis is None:
                return [None, "", None, ""]
            if not analysis.num_layers:
                return [None, "This model's encoder keeps every token.", None, "This model's encoder has no OESM step."]
            index = min(max(int(layer_value), 1), analysis.num_layers) - 1
            kept = core.kept_map(analysis, index)
            oesm = core.oesm_map(analysis, index)
            return [kept[0], kept[1], oesm[0] if oesm else None,
                    oesm[1] if oesm else "This model's encoder has no OESM step."]

        def on_load_demo() -> list[Any]:
            with slot.lock:
                if slot.model is None and slot.demo_weights is not None:
                    try:
                        slot.model, slot.description = load_weights(slot.demo_weights)
                    except (OSError, ValueError, RuntimeError) as e:
                        return [gr.update(), gr.update(), gr.update(visible=True), _message(str(e), "error")]
            model = slot.model
            return [_model_line(slot), gr.update(visible=False),
                    gr.update(value=model.cfg.encoder.keep_ratio, interactive=core.selects_tokens(model)),
                    _message("Model loaded: pick an example or upload a picture.", "info")]

        model_events = dict(concurrency_id="model", concurrency_limit=1, show_progress="minimal")
        views = dict(show_progress="hidden")
        for event in (image_in.change(on_image, [image_in, keep_ratio], results, **model_events),
                      url_button.click(on_url, [url_in, keep_ratio], results, **model_events),
                      url_in.submit(on_url, [url_in, keep_ratio], results, **model_events),
                      keep_ratio.change(on_keep_ratio, [state, keep_ratio], results, trigger_mode="always_last",
                                        **model_events)):
            event.then(on_threshold, [state, threshold], threshold_views, **views).then(
                on_layer, [state, layer], layer_views, **views)
        threshold.change(on_threshold, [state, threshold], threshold_views, trigger_mode="always_last", **views)
        layer.change(on_layer, [state, layer], layer_views, trigger_mode="always_last", **views)
        demo_button.click(on_load_demo, [], [model_line, no_model_row, keep_ratio, message], **model_events)
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return app


class _RawImage(gr.Image):
    """``gr.Image`` that hands the uploaded file to the app undecoded, as ``(path, original name)``.

    Gradio's own preprocessing opens the file with PIL and fails with PIL's message on a file that is not an
    image; here the library's reader decides (:func:`focus_detr.app.core.read_upload`), and its one-line
    message is shown in the page. ``is_template`` makes the browser use the ordinary image component."""

    is_template = True

    def preprocess(self, payload: Any) -> tuple[str, str] | None:  # type: ignore[override]
        if payload is None:
            return None
        if getattr(payload, "path", None) is None:  # a pasted picture as a data: URL -> Gradio writes a file
            try:
                path = super().preprocess(payload)
            except Exception:  # noqa: BLE001 -- undecodable data: the page says the upload did not arrive
                return "", "pasted image"
            return (str(path), "pasted image") if path is not None else None
        name = getattr(payload, "orig_name", None) or Path(payload.path).name
        return str(payload.path), os.path.basename(name)


def _model_line(slot: ModelSlot) -> str:
    if slot.model is None:
        return "Model: none loaded."
    m = slot.model
    return (f"Model: {slot.description} · on {m.device} · {m.cfg.encoder.mode} encoder, "
            f"{m.cfg.encoder.num_layers} layers · {len(m.cfg.class_names or ())} classes")


def _no_model_message(slot: ModelSlot) -> str:
    return "No model loaded: " + ("load the demo-trained model with the button above, or start the app with "
                                  "weights." if slot.demo_weights is not None else "start the app with weights "
                                  "(see above).")


def _message(text: str, kind: str) -> dict[str, Any]:
    prefix = "**Could not use this input:** " if kind == "error" else ""
    return gr.update(value=prefix + text if text else "", visible=bool(text), elem_classes=[kind])


def _empty_table() -> Any:
    import pandas as pd

    return pd.DataFrame([], columns=list(core.TABLE_HEADERS))


def _table(analysis: Analysis, threshold: float) -> Any:
    import pandas as pd

    return pd.DataFrame(core.table_rows(core.above(analysis.detections, threshold)), columns=list(core.TABLE_HEADERS))


def theme() -> Any:
    """Gradio's default look with the system fonts: the page never asks a font server for anything."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def launch(app: gr.Blocks, host: str, port: int, work: Path, quiet: bool = False, block: bool = True) -> None:
    """Serve ``app`` on ``host:port`` (uploads limited to :data:`focus_detr.app.core.MAX_UPLOAD_BYTES`); files
    under ``work`` (the json downloads) may be served."""
    app.launch(server_name=host, server_port=port, share=False, max_file_size=core.MAX_UPLOAD_BYTES,
               show_error=False, quiet=quiet, ssr_mode=False, prevent_thread_lock=not block, theme=theme(), css=_CSS,
               allowed_paths=[str(work)], inbrowser=False)
