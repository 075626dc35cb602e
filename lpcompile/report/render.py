"""Rendering the report: report.json (plain JSON) and report.md (per-layer table, totals, rotation
and format-selection sections). Measuring is `lpcompile.report.measure`."""

from __future__ import annotations

import json

from lpcompile.metrics import format_db


def to_markdown(report: dict) -> str:
    t = report["totals"]
    cal = report.get("calibration") or {}
    lines = [
        f"# lpcompile report: {report['format']} for {report['target']}",
        "",
    ]
    if cal.get("is_random"):
        lines += ["> **Smoke run**: calibrated and measured on random inputs, not real data. "
                  "The errors below say nothing about accuracy on real inputs.", ""]
    lines += [f"> **Warning**: {w}" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    ratio = t["weight_bytes"] / t["weight_bytes_fp32"] if t["weight_bytes_fp32"] else float("nan")
    measured = report.get("measured_on") or {}
    lines += [
        f"- calibration: {cal.get('source', 'none')} ({cal.get('samples', 0)} samples)",
        f"- layers quantized: {t['layers_quantized']}; excluded: {', '.join(report['excluded']) or 'none'}",
        f"- weights of the quantized layers: {_mb(t['weight_bytes'])} vs {_mb(t['weight_bytes_fp32'])} in fp32 "
        f"({ratio:.3f}×); {_model_ratio_text(t)}",
        f"- output vs float: SQNR {format_db(t['output_sqnr_db'])} dB, cosine {_fmt(t['output_cosine'], 5)}"
        f" (p5 {_fmt(t.get('output_cosine_p5'), 5)}, min {_fmt(t['output_cosine_min'], 5)})" + (f", measured on {measured['text']}" if measured else ""),
        _rotation_line(report.get("rotate")),
        "- stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["stages_seconds"].items()),
        "",
        "| layer | op | weights | activations | bytes (fp32 → q) | SQNR dB |",
        "|---|---|---|---|---|---|",
    ]
    for l in report["layers"]:
        lines.append(
            f"| {l['name']} | {l['op']} | {l['weight_format']}"
            + (f", sparse {l['sparsity']} (density {l['density']:.3f})" if l.get("sparsity") else "")
            + f" | {l['activation_format']} | "
            f"{l['weight_bytes_fp32']:,} → {l['weight_bytes']:,} | {format_db(l['sqnr_db'])} |"
        )
    lines += _rotation_section(report.get("rotate"))
    if report.get("select"):
        lines += select_markdown(report["select"])
    return "\n".join(lines) + "\n"


def model_ratio(totals: dict) -> float | None:
    """Bytes of every weight of the quantized model over the float model's in fp32."""
    whole, fp32 = totals.get("model_bytes"), totals.get("model_float_bytes")
    return whole / fp32 if whole is not None and fp32 else None


def _model_ratio_text(totals: dict) -> str:
    r = model_ratio(totals)
    return "whole model: n/a" if r is None else f"whole model {_mb(totals['model_bytes'])} ({r:.3f}× fp32)"


def _rotation_section(rot: dict | None) -> list[str]:
    """Where the rotate pass rotated (folded stream regions, folded chains, online transforms),
    what it skipped and why, and, when it measured them, each linear input's outliers before and
    after (kurtosis of the values; largest over median per-channel max |x|)."""
    if not rot or rot.get("mode") == "off":
        return []
    lines = ["", "## Rotation", ""]
    sites = [("region", r.get("name"), r.get("consumers", []), r) for r in rot.get("regions", [])]
    sites += [("chain", c.get("name") or c.get("producer"), c.get("consumers") or c.get("layers", []), c)
              for c in rot.get("chains", [])]
    sites += [("online", o.get("input"), o.get("layers", []), o) for o in rot.get("online", [])]
    if sites:
        lines += ["| site | where | linears | status | how / why not |", "|---|---|---|---|---|"]
        for kind, where, layers, e in sites:
            how = e.get("rotation") if e.get("status") in ("folded", "online") else e.get("reason")
            lines.append(f"| {kind} | {where} | {_names(layers)} | {e.get('status', '?')} | {how or ''} |")
    else:
        lines.append("Nothing was rotated or considered.")
    outliers = rot.get("outliers")
    if outliers:
        lines += ["", "Linear inputs before → after rotation (measured on the calibration data):", "",
                  "| layer | kurtosis | max / median channel |", "|---|---|---|"]
        for name, m in outliers.items():
            before, after = m.get("before") or {}, m.get("after") or {}
            lines.append(f"| {name} | {_fmt(before.get('kurtosis'), 1)} → {_fmt(after.get('kurtosis'), 1)} | "
                         f"{_fmt(before.get('max_to_median'), 1)} → {_fmt(after.get('max_to_median'), 1)} |")
    elif outliers is None:
        lines += ["", "Outliers before/after: not measured (no calibration data)."]
    return lines


def _rotation_line(rot: dict | None) -> str:
    if not rot or rot.get("mode") == "off":
        return "- rotation: off" + _rotation_choice(rot)
    counters = rot.get("counters") or {}
    done = ", ".join(f"{k} {v}" for k, v in counters.items()) or "nothing rotated"
    return f"- rotation ({rot['mode']}): {done} (details: report.json `rotate`)" + _rotation_choice(rot)


def _rotation_choice(rot: dict | None) -> str:
    """format=auto, and a recipe whose default rotates, measure the model with and without
    rotation and keep the better one (a recipe: on the held-out calibration samples)."""
    tried = (rot or {}).get("chosen_from")
    if not tried:
        return f" — {rot['choice']}" if (rot or {}).get("choice") else ""
    parts = "; ".join(f"{m}: SQNR {format_db(v['output_sqnr_db'])} dB"
                      + (f" at {_fmt(v['avg_weight_bits'], 2)} bits, goal met {v['goal_met']}" if "avg_weight_bits" in v
                         else f", cosine {_fmt(v['output_cosine'], 5)}")
                      for m, v in tried.items())
    return f" — {rot.get('choice', 'chosen')} after measuring both ({parts})"


def _names(names: list, shown: int = 3) -> str:
    names = [str(n) for n in names]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) + more) or "-"


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False)


def select_markdown(sel: dict) -> list[str]:
    from lpcompile.chart import columns

    b, p, a = sel["budget"], sel["predicted"], sel["achieved"]
    goal = {"bits": f"average weight bits <= {b.get('value')}", "bytes": f"weight bytes <= {b.get('value')}",
            "min_cosine": f"{b.get('stat', 'mean')} output cosine >= {b.get('value')}",
            "latency": f"linear kernels' latency <= {b.get('value')} us at {b.get('tokens')} tokens"}.get(
                b.get("kind"), "reused plan")
    lines = [
        "", "## Format selection (--format auto)", "",
        f"- goal: {goal}; met: {a['budget_met']}",
        f"- achieved: {a['avg_weight_bits']:.4f} bits per weight (float layers at 32), {_mb(int(a['weight_bytes']))};"
        f" output SQNR {format_db(a['output_sqnr_db'])} dB, cosine {_fmt(a['output_cosine'], 5)}",
        f"- predicted by the sensitivity model: {_fmt(p.get('avg_weight_bits'), 4)} bits, SQNR "
        f"{format_db(p.get('predicted_sqnr_db'))} dB, cosine {_fmt(p.get('predicted_cosine'), 5)}",
    ]
    lat = sel.get("latency") or {}
    if a.get("latency_us") is not None:
        lines.append(f"- kernel latency (measured on {lat.get('target')}, {lat.get('tokens')} tokens): "
                     f"{a['latency_us']:.1f} us over {lat.get('layers_timed')} linear layers"
                     + (f"; not timed (no native kernel): {', '.join(lat['untimed'])}" if lat.get("untimed") else "")
                     + (f" ({lat['note']})" if lat.get("note") else ""))
    elif lat.get("not_measured"):
        lines.append(f"- kernel latency: not measured ({lat['not_measured']})")
    secs = sel.get("measurement_seconds")
    if sel.get("sensitivity_cached"):
        lines.append("- sensitivity: reused from the plan given (same model, calibration and settings)")
    elif secs:
        lines.append(f"- sensitivity measured on {secs['samples']} calibration samples: layer-local {secs['local']:.1f} s, "
                     f"end-to-end {secs['end_to_end']:.1f} s")
    for v in sel.get("verification") or []:
        lines.append(f"  - solved for cosine {v['solved_for_cosine']:.5f}: {_fmt(v['avg_weight_bits'], 3)} bits, "
                     f"measured cosine {v['measured_cosine']:.5f}, 95% lower bound "
                     f"{v.get('measured_cosine_lower_bound', float('nan')):.5f} ({v.get('samples')} held-out calibration samples)")
    ag = sel["exponent_vs_outliers"]
    if "spearman_best_exmy" in ag:
        lines.append(f"- FP8 exponent vs outliers over {ag['layers']} layer inputs (Spearman with the largest/median "
                     f"channel max): {_fmt(ag['spearman_best_exmy'])} for the best ExMy's exponent bits, "
                     f"{_fmt(ag['spearman_deployable'])} for the E4M3/E5M2 choice, "
                     f"{_fmt(ag['spearman_exponent_gain_vs_max_to_median'])} for the dB E4M3 gains over E2M5 "
                     f"({_fmt(ag['spearman_exponent_gain_vs_kurtosis'])} against kurtosis); "
                     + ", ".join(f"best {k}: {v['layers']} layers, median max/median {v['median_max_to_median']:.1f}"
                                 for k, v in ag["by_best_exponent"].items()))
    lines += [
        "", "![per-layer sensitivity and the chosen format](select.png)", "",
        "Chart, left: one row per layer (numbered as below), one column per weight format (columns: "
        + ", ".join(f"{i} = {c}" for i, c in enumerate(columns(sel))) + "); colour = end-to-end output SQNR "
        "with only that layer's weights quantized (scale below the map, dB; grey: not a candidate for the layer); "
        "the chosen format is boxed. Right: layer-local SQNR of the layer's input in E2M5, E3M4, E4M3, E5M2 "
        "(columns = exponent bits), the best boxed.", "",
        "| # | layer | chosen weights | bits/w | kernel us | e2e SQNR dB per weight format | input: max/median, kurtosis | "
        "best ExMy (input / weights) | deployable FP8, gap dB | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(sel["layers"]):
        e2e = ", ".join(f"{k.split(':')[0]}{'/' + k.split(':')[1] if 'block' in k else ''} {format_db(v, 1)}"
                        for k, v in r["e2e_sqnr_db"].items())
        out = r.get("outliers") or {}
        ex = r.get("exmy") or {}
        ab, wb = ex.get("activations_best") or {}, ex.get("weights_best") or {}
        lines.append(
            f"| {i} | {r['name']} | {r['weights']}{'' if r['activations'] == 'float' else ' + A ' + r['activations']} | "
            f"{r['bits_per_weight']:.3f} | {_fmt(r.get('latency_us'), 1)} | {e2e} | "
            + (f"{out['max_to_median']:.1f}, {out['kurtosis']:.1f}" if out else "-") + " | "
            + (f"{ab.get('exmy', '-')} / {wb.get('exmy', '-')}" if ab else "-") + " | "
            + (f"{ab['deployable']} ({ab['gap_db']:.1f})" if ab else "-") + f" | {r['reason']} |")
    return lines
