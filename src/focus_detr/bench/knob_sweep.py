"""The speed knob on a trained model: held-out AP and latency for a range of keep ratios.

One trained model (e.g. the demo's), its held-out split: for every keep ratio the model's ``cfg`` is swapped
(:func:`focus_detr.model.knobs.with_keep_ratio`, same weights), the split is evaluated (COCO AP) and the
latency is measured on a fixed set of held-out images, every configuration interleaved round by round (one
torch thread by default: the least disturbed by other processes). The dense-mode model with the same weights
is measured too, as the cost reference (its AP is not meaningful when the weights were trained in focus mode).

    python benchmarks/bench_keep_ratio.py --weights runs/demo/model_final.pth --data runs/demo/data \
        --plot docs/images/keep_ratio_ap_vs_latency.png
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..model.knobs import check_keep_ratio, with_keep_ratio
from .core import machine_info
from .flops import count_stage_flops
from .timing import interleaved, timed_stages

DEFAULT_KEEP_RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _dense_twin(model):
    """The dense-mode model with ``model``'s weights (the foreground selector and OESM are dropped)."""
    from ..model import build_model

    dense = build_model(model.cfg, encoder_mode="dense")
    result = dense.load_state_dict(model.state_dict(), strict=False)
    extra = [k for k in result.unexpected_keys if not (k.startswith("foreground_selector.") or ".oesm_" in k)]
    if result.missing_keys or extra:
        raise RuntimeError(f"dense twin does not share the weights: missing {result.missing_keys}, unexpected {extra}")
    return dense.eval()


def keep_ratio_sweep(weights: str, data: str, split: str = "val", keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
                     dense: bool = True, latency_images: int = 8, repeats: int = 5, threads: int | None = 1,
                     max_images: int | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """AP and latency of ``weights`` at each keep ratio on ``data``'s ``split`` (see the module doc).

    Returns ``{machine, weights, data, split, trained_keep_ratio, settings, points: [{config, keep_ratio,
    AP, AP50, AP75, APs, APm, APl, ms_per_image, encoder_ms_per_image, tokens_fraction, encoder_gflops,
    total_gflops, latency_vs_dense}]}``.
    """
    from ..data.layouts import require_split
    from ..engine.data import build_eval_dataset, build_eval_loader
    from ..engine.evaluate import evaluate
    from ..inference import load_model

    say = progress or (lambda _m: None)
    ratios = [check_keep_ratio(r)[0] for r in keep_ratios]
    if threads:
        torch.set_num_threads(threads)
    model, description = load_model(weights, device="cpu")
    model.eval()
    enc = model.cfg.encoder
    if enc.mode == "dense":
        raise ValueError(f"{weights}: a dense-mode model has no keep ratio to sweep")
    trained = enc.keep_ratio
    source = require_split(data, split)
    dataset = build_eval_dataset(source, split, model.cfg.test_short_side, model.cfg.test_max_size,
                                 model.cfg.class_names, model.cfg.num_classes)
    n_lat = min(latency_images, len(dataset))
    loader = build_eval_loader(dataset, range(n_lat), 1, 0, model.cfg.pixel_mean, model.cfg.pixel_std)
    batches = [images for images, _ in loader]

    configs: dict[str, tuple[Any, float | None]] = {f"focus {r:g}": (model, r) for r in ratios}
    if dense:
        configs["dense"] = (_dense_twin(model), None)
    points: dict[str, dict[str, Any]] = {}
    for name, (m, r) in configs.items():
        if r is not None:
            with_keep_ratio(m, r)
        say(f"{name}: evaluating {split} ({len(dataset) if max_images is None else min(max_images, len(dataset))} images)")
        metrics = evaluate(m, dataset, torch.device("cpu"), max_images=max_images) or {}
        with torch.no_grad():
            count, out = count_stage_flops(m, lambda m=m: m(batches[0]))
        n = int((~out.token_padding_mask).sum())
        trace = out.encoder_trace
        per_layer = [int(t.shape[1]) for t in trace.selected_indices] or [n] * m.cfg.encoder.num_layers
        points[name] = {"config": name, "keep_ratio": r,
                        **{k: metrics.get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                        "tokens_fraction": sum(per_layer) / (n * len(per_layer)),
                        "encoder_gflops": count.total("encoder") / 1e9, "total_gflops": count.total() / 1e9,
                        "image_size": list(batches[0].tensor.shape[-2:])}

    def runner(m, r) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            if r is not None:
                with_keep_ratio(m, r)
            total: dict[str, float] = {}
            with torch.no_grad():
                for b in batches:
                    for k, v in timed_stages(m, lambda b=b: m(b), torch.device("cpu")).items():
                        total[k] = total.get(k, 0.0) + v / len(batches)
            return total

        return run

    say(f"latency: {repeats} interleaved rounds over {len(configs)} configurations, {n_lat} images each")
    samples = interleaved({name: runner(m, r) for name, (m, r) in configs.items()}, repeats, warmup=1,
                          progress=say)
    for name in configs:
        points[name]["ms_per_image"] = statistics.median(s["total"] for s in samples[name]) * 1000
        points[name]["min_ms_per_image"] = min(s["total"] for s in samples[name]) * 1000
        points[name]["encoder_ms_per_image"] = statistics.median(s.get("encoder", 0.0) for s in samples[name]) * 1000
    if dense:
        base, base_all = points["dense"]["ms_per_image"], [s["total"] for s in samples["dense"]]
        for name in configs:
            p = points[name]
            p["latency_vs_dense"] = p["ms_per_image"] / base
            p["latency_vs_dense_paired"] = statistics.median(
                a["total"] / b for a, b in zip(samples[name], base_all))
    with_keep_ratio(model, trained)
    return {"machine": machine_info(torch.device("cpu")), "weights": str(weights), "model": description,
            "data": str(data), "split": split, "num_images": len(dataset), "trained_keep_ratio": trained,
            "cascade": list(enc.cascade), "settings": {"latency_images": n_lat, "repeats": repeats,
                                                        "threads": torch.get_num_threads(), "max_images": max_images},
            "points": list(points.values())}


def format_sweep(result: dict[str, Any], markdown: bool = False) -> list[str]:
    from .report import format_number, markdown_table

    rows = [[p["config"], format_number(p["keep_ratio"], "{:g}"), format_number(p["tokens_fraction"] * 100, "{:.0f}%"),
             format_number(p["encoder_gflops"], "{:.3f}"), format_number(p["total_gflops"], "{:.3f}"), format_number(p["ms_per_image"], "{:.1f}"),
             format_number(p["encoder_ms_per_image"], "{:.1f}"), format_number(p.get("latency_vs_dense"), "{:.2f}"),
             format_number(p.get("latency_vs_dense_paired"), "{:.2f}"), format_number(p["AP"], "{:.3f}"), format_number(p["AP50"], "{:.3f}")]
            for p in result["points"]]
    s = result["settings"]
    head = [f"Keep-ratio sweep of {result['model']} on {result['data']} ({result['split']}, {result['num_images']} "
            f"images; trained at keep ratio {result['trained_keep_ratio']:g}, cascade {result['cascade']}); latency: "
            f"median of {s['repeats']} interleaved rounds over {s['latency_images']} held-out images, "
            f"{s['threads']} thread(s), {result['machine']['cpu']}:", ""]
    return head + markdown_table(["config", "keep ratio", "tokens updated", "encoder GFLOPs", "GFLOPs", "ms/image",
                          "encoder ms/image", "vs dense", "vs dense paired", "AP", "AP50"], rows, markdown)


def plot_sweep(result: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Held-out AP against latency per image: the focus keep ratios as a line, the dense model as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    # in keep-ratio order: the path the knob takes (latency need not be monotonic on a noisy machine)
    focus = sorted((p for p in result["points"] if p["keep_ratio"] is not None), key=lambda p: p["keep_ratio"])
    ax.plot([p["ms_per_image"] for p in focus], [p["AP"] or 0.0 for p in focus], "o-", color="#1f77b4",
            label="focus, keep ratio r (same weights)")
    for p in focus:
        trained = abs(p["keep_ratio"] - result["trained_keep_ratio"]) < 1e-9
        ax.annotate(f"r={p['keep_ratio']:g}" + (" (trained)" if trained else ""), (p["ms_per_image"], p["AP"] or 0.0),
                    textcoords="offset points", xytext=(5, -12 if trained else 5), fontsize=8)
    for p in result["points"]:
        if p["keep_ratio"] is None:
            ax.plot([p["ms_per_image"]], [p["AP"] or 0.0], "*", markersize=13, color="#d62728",
                    label="dense mode, same weights (cost reference)")
    s = result["settings"]
    ax.set_xlabel(f"latency per image, ms (median, {s['threads']} thread(s), {result['machine']['cpu']})")
    evaluated = result["num_images"] if s.get("max_images") is None else min(s["max_images"], result["num_images"])
    ax.set_ylabel(f"held-out AP ({evaluated} images)")
    ax.set_title("Speed knob: keep ratio of the focus encoder", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(os.fspath(path), dpi=130, facecolor="white")
    return os.fspath(path)
