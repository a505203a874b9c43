"""Text / Markdown tables and plots of a :func:`~focus_detr.bench.core.run_benchmark` report."""

from __future__ import annotations

import os
from typing import Any


def format_number(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return lines
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])  # noqa: E731
                                   for i, c in enumerate(cells))
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def stage_rows(entry: dict[str, Any], modes: list[str], stages: list[str], key: str, fmt: str) -> tuple[list[str], list[list[str]]]:
    """One row per stage: the value of each mode, then the ratios (for ``ms`` also the paired ratios)."""
    ratio_names = list(entry.get("ratios", {}))
    paired = key == "ms"
    header = ["stage"] + [f"{m}" for m in modes] + ratio_names
    if paired:
        header += [f"{r} paired" for r in ratio_names] + [f"{r} min" for r in ratio_names]
    rows = []
    for stage in stages:
        row = [stage] + [format_number(entry["modes"][m]["stages"][stage][key], fmt) for m in modes]
        row += [format_number(entry["ratios"][r][stage][key], "{:.2f}") for r in ratio_names]
        if paired:
            row += [format_number(entry["ratios"][r][stage].get("ms_paired"), "{:.2f}") for r in ratio_names]
            row += [format_number(entry["ratios"][r][stage].get("ms_min"), "{:.2f}") for r in ratio_names]
        rows.append(row)
    return header, rows


def efficiency_rows(entry: dict[str, Any], modes: list[str], stages: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per stage: per mode ``GFLOP/s (percent of peak)``."""
    header = ["stage"] + [f"{m} GFLOP/s (of peak)" for m in modes]
    rows = []
    for stage in stages:
        row = [stage]
        for m in modes:
            st = entry["modes"][m]["stages"][stage]
            rate, frac = st.get("gflops_per_s"), st.get("of_peak")
            row.append("-" if rate is None else f"{rate:.1f} ({frac * 100:.0f}%)" if frac is not None else f"{rate:.1f}")
        rows.append(row)
    return header, rows


def format_peaks(peaks: list[dict[str, Any]], markdown: bool = False) -> list[str]:
    rows = [[p["dtype"], str(p["threads"] or "-"), str(p["n"]), f"{p['gflops']:.1f}",
             ", ".join(f"{g:.1f}" for g in p["trials_gflops"])] for p in peaks]
    return markdown_table(["dtype", "threads", "n", "peak GFLOP/s", "trials"], rows, markdown)


def format_report(report: dict[str, Any], markdown: bool = False) -> str:
    """Human-readable tables: latency and GFLOPs by stage per mode with ratios, memory, anchor, targets."""
    meta = report["meta"]
    modes, stages = report["modes"], report["stages"]
    s = report["settings"]
    out: list[str] = []
    h = "### " if markdown else ""
    for entry in report["results"]:
        hw = f"{entry['size'][0]}x{entry['size'][1]}"
        out.append(f"{h}{report['preset']} at {hw}, batch {entry['batch']}, {meta['device']}, "
                   f"{meta['torch_threads']} threads: median of {s['repeats']} interleaved runs "
                   f"(after {s['warmup']} warm-up)")
        if meta.get("allocator"):
            out.append(f"CPU memory: {meta['allocator']} (FOCUS_DETR_ALLOCATOR); OpenMP wait policy: "
                       f"{meta.get('omp_wait_policy') or 'default'}")
        out.append("")
        header, rows = stage_rows(entry, modes, stages, "ms", "{:.1f}")
        out.append("Latency (ms, median) by stage; ratios of the medians, 'paired': median over rounds of the "
                   "ratio of the two runs of the same round, 'min': ratio of the fastest runs"
                   + (":" if not markdown else ""))
        out.append("")
        out += markdown_table(header, rows, markdown)
        out.append("")
        header, rows = stage_rows(entry, modes, stages, "gflops", "{:.2f}")
        out.append("GFLOPs by stage (FlopCounterMode + deformable sampling, 2 FLOP/MAC)" + (":" if not markdown else ""))
        out.append("")
        out += markdown_table(header, rows, markdown)
        out.append("")
        peak = report.get("efficiency_peak")
        if peak:
            out.append(f"Achieved GFLOP/s by stage and fraction of the machine's {peak['dtype']} matmul peak "
                       f"({peak['gflops']:.1f} GFLOP/s: torch.mm {peak['n']}x{peak['n']}, "
                       f"{peak['threads'] or 'device'} thread(s), same run)" + (":" if not markdown else ""))
            out.append("")
            out += markdown_table(*efficiency_rows(entry, modes, stages), markdown)
            out.append("")
        spread = {m: entry["modes"][m]["stages"]["total"]["spread"] for m in modes}
        out.append("Run-to-run spread of the total ((max-min)/median): "
                   + ", ".join(f"{m} {v * 100:.0f}%" for m, v in spread.items()))
        calls = entry.get("backbone_calls_per_forward", {})
        if calls:
            note = ""
            if any(v > 1 for v in calls.values()):
                note = " -- the detector recomputes its backbone; `--backbone-once` measures it computed once"
            elif report["settings"].get("backbone_once"):
                note = " (with the --backbone-once workaround)"
            out.append("Backbone computations per forward: " + ", ".join(f"{m} {v}" for m, v in calls.items()) + note)
        tokens = entry.get("tokens", {})
        if tokens:
            out.append("Tokens updated per encoder layer: " + "; ".join(
                f"{m} {t['per_layer']} of N={t['num_tokens']} ({t['fraction_updated'] * 100:.0f}%)"
                for m, t in tokens.items()))
        out.append("")
        mem = entry.get("memory", {})
        if "skipped" in mem:
            out.append(f"Peak memory: skipped ({mem['skipped']})")
        elif mem:
            rows = []
            for m, r in mem.items():
                if "error" in r:
                    rows.append([m, "error", r["error"][:60], ""])
                else:
                    rows.append([m, format_number(r.get("peak_mb"), "{:.0f}"), format_number(r.get("before_mb"), "{:.0f}"),
                                 format_number(r.get("increase_mb"), "{:.0f}")])
            method = next((r.get("method") for r in mem.values() if "method" in r), "")
            out.append(f"Peak memory of one inference, fresh process per mode ({method})" + (":" if not markdown else ""))
            out.append("")
            out += markdown_table(["mode", "peak MiB", "before MiB", "increase MiB"], rows, markdown)
        out.append("")
        anchor = entry.get("anchor")
        if anchor:
            st = anchor["stages_ms"]
            out.append(f"Anchor: transformers Deformable DETR (two-stage, R50, random init): total "
                       f"{anchor['total']['ms']:.1f} ms (backbone {st.get('backbone', 0):.1f}, encoder "
                       f"{st.get('encoder', 0):.1f}, decoder {st.get('decoder', 0):.1f}), "
                       f"{anchor['total']['gflops']:.1f} GFLOPs; "
                       + ", ".join(f"{m}/anchor latency {anchor[f'{m}/anchor_ms']:.2f} (paired "
                                   f"{format_number(anchor.get(f'{m}/anchor_ms_paired'), '{:.2f}')}, min "
                                   f"{format_number(anchor.get(f'{m}/anchor_ms_min'), '{:.2f}')})" for m in modes))
            out.append("")
        check = entry.get("official_flop_check")
        if check:
            o, u = check["official_gflops"], check["ours_gflops"]
            out.append("Focus mode vs the official model's FlopCounterMode count (GFLOP, sampling excluded): "
                       + ", ".join(f"{k} {u[k]:.1f} vs {o[k]:.1f}" for k in o)
                       + f"; sampled values {check['sampled_values']['ours']} vs {check['sampled_values']['official']}")
            out.append("")
    anchor_info = report.get("anchor", {})
    if "skipped" in anchor_info:
        out.append(f"Anchor skipped: {anchor_info['skipped']}")
        out.append("")
    if report.get("peaks"):
        units = report["meta"].get("cpu_matrix_units") or {}
        have = [k for k, v in units.items() if v]
        out.append("Matrix-multiply peak of this machine (torch.mm, best of the trials, same run; CPU flags: "
                   + (", ".join(have) or "unknown") + ")" + (":" if not markdown else ""))
        out.append("")
        out += format_peaks(report["peaks"], markdown)
        out.append("")
    if report.get("contention"):
        from .contention import format_contention

        out += format_contention(report["contention"], markdown)
        out.append("")
    if report.get("train_step"):
        out += format_train_step(report["train_step"], markdown)
        out.append("")
    if report.get("targets"):
        out.append("Targets:")
        for t in report["targets"]:
            verdict = "" if t["met"] is None else (" MET" if t["met"] else " MISSED")
            limit = "" if t["limit"] is None else f" (limit {t['limit']})"
            paired = f" (paired {t['paired']:.3f})" if t.get("paired") is not None else ""
            if t.get("min") is not None:
                paired += f" (min {t['min']:.3f})"
            out.append(f"  {t['name']}: {format_number(t['value'], '{:.3f}')}{paired}{limit}{verdict}")
    return "\n".join(out).rstrip() + "\n"


def format_train_step(result: dict[str, Any], markdown: bool = False) -> list[str]:
    out = [f"Training step ({result['preset']}, batch {result['batch']} at {result['size'][0]}x{result['size'][1]}, "
           f"{result.get('device', 'cpu')}, {result.get('threads', '?')} threads, forward + loss + backward + AdamW; "
           f"median of {result['steps']} interleaved steps):", ""]
    with_memory = any("memory" in r for r in result["modes"].values())
    dense = result["modes"].get("dense")
    rows = []
    for m, r in result["modes"].items():
        row = [m, f"{r['step_ms']:.1f}", f"{r['images_per_s']:.2f}", f"{r['spread'] * 100:.0f}%",
               format_number(r["step_ms"] / dense["step_ms"], "{:.2f}") if dense else "-"]
        if with_memory:
            mem = r.get("memory", {})
            if "error" in mem:
                row += ["error", mem["error"][:60], "-"]
            else:
                inc, dinc = mem.get("increase_mb"), (dense or {}).get("memory", {}).get("increase_mb")
                row += [format_number(mem.get("peak_mb"), "{:.0f}"), format_number(inc, "{:.0f}"),
                        format_number(inc / dinc if inc and dinc else None, "{:.2f}")]
        rows.append(row)
    header = ["mode", "step ms", "images/s", "spread", "step time vs dense"]
    if with_memory:
        header += ["peak MiB", "step increase MiB", "increase vs dense"]
    out += markdown_table(header, rows, markdown)
    return out


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> list[str]:
    """Latency bars by stage and mode (one figure per size; ``_HxW`` is added to the name when several)."""
    from ..viz.plots import plot_benchmark_bars

    written = []
    base, ext = os.path.splitext(str(path))
    for entry in report["results"]:
        hw = f"{entry['size'][0]}x{entry['size'][1]}"
        target = str(path) if len(report["results"]) == 1 else f"{base}_{hw}{ext or '.png'}"
        rows = [{"mode": m, "stage": stage, "ms": entry["modes"][m]["stages"][stage]["ms"]}
                for m in report["modes"] for stage in report["stages"]]
        plot_benchmark_bars(rows, target, title=f"{report['preset']} {hw} latency per stage "
                                                f"({report['meta']['device']}, {report['meta']['torch_threads']} threads)")
        written.append(target)
    return written
