"""The main job's report: markdown table, self-contained HTML page, and its behaviour figures.

Everything here renders the JSON-able report dict that `experiments.compare_refusal` writes, so a
report can be re-rendered from report.json without touching a model.
"""

from __future__ import annotations

from repair.report import small_pct


def asr_figure(report: dict):
    """ASR under both judges per variant, perplexity in the hover, collapsed variants hatched."""
    import plotly.graph_objects as go

    rows = report["variants"]
    names = [v["variant"] for v in rows]
    fig = go.Figure()
    for judge, label in (("wei2024", "Wei et al. judge"), ("arditi2024", "Arditi et al. judge")):
        fig.add_trace(go.Bar(
            x=names, y=[100 * v["asr"][judge] for v in rows], name=label,
            marker_pattern_shape=["x" if v["collapse"]["collapsed"] else "" for v in rows],
            customdata=[v["perplexity"] for v in rows],
            hovertemplate="%{x}<br>ASR %{y:.1f}%<br>perplexity %{customdata:.1f}<extra>" + label + "</extra>",
        ))
    fig.update_layout(title=f"Vanilla ASR on {rows[0]['n_prompts']} AdvBench goals (hatched: collapsed)", barmode="group",
                      xaxis_title="variant", yaxis_title="attack success rate (%)", yaxis_range=[0, 100], height=450, width=900)
    return fig


def cosine_per_layer_figure(report: dict):
    """Per-layer cosine of each variant's difference-of-means direction to the original's (last position)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in report["variants"][1:]:
        fig.add_trace(go.Scatter(x=list(range(1, report["n_layers"])), y=v["cosine_per_layer_last_position"][1:], mode="lines+markers", name=v["variant"]))
    fig.update_layout(title="Cosine to the original's direction at the same layer (last post-instruction token)",
                      xaxis_title="layer (block input)", yaxis_title="cosine similarity", height=450, width=900, legend_title="variant")
    return fig


def render_html(markdown_text: str, figs: dict, title: str) -> str:
    """One self-contained page: the markdown report plus every figure, plotly.js inlined once (works offline)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs.values())]
    style = ("body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f3f3f3}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>"
            + body + "<h2>Figures</h2>" + "".join(parts) + "</body></html>")



def render_markdown(report: dict) -> str:
    lines = [
        f"# Refusal under compression: {report['model_name']}",
        "",
        f"Wall time {_wall(report)}. ASR: vanilla greedy decoding on the first "
        f"{report['variants'][0]['n_prompts']} AdvBench goals, at most {report['config']['max_new_tokens']} new tokens; "
        "Wei = Wei et al. 2024 judge (31 case-sensitive strings and >= 20 words), Arditi = Arditi et al. 2024 judge "
        "(12 strings, case-insensitive). Directions: difference of means of block inputs at the post-instruction "
        f"tokens `{report['post_instruction_tokens']!r}` over {report['config']['n_train']} harmful + "
        f"{report['config']['n_train']} harmless instructions; cosine to the original's direction at the same (position, layer).",
        "",
        "| variant | decoder sparsity | ASR Wei | ASR Arditi | perplexity | zero-shot avg | collapsed | norm-peak layer | cos @ original's peak (last pos) | min cos (last pos) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        flag = f"**yes** ({v['collapse']['reason']})" if v["collapse"]["collapsed"] else "no"
        lines.append(
            f"| {v['variant']} | {v['decoder_sparsity']:.1%} | {v['asr']['wei2024']:.1%} | {v['asr']['arditi2024']:.1%} | "
            f"{v['perplexity']:.2f} | {_zero_shot(v.get('zero_shot'))} | {flag} | {v['norm_peak_layer']} | {v['cosine_at_original_peak']:.3f} | "
            f"{min(v['cosine_per_layer_last_position'][1:], default=1.0):.3f} |"
        )
    lines += ["", "Collapsed variants are never safe: their ASR reflects broken text, not refusal.", "",
              "## Cosine to the original's direction, per layer (last post-instruction position)", ""]
    n_layers = report["n_layers"]
    lines.append("| variant | " + " | ".join(str(l) for l in range(n_layers)) + " |")
    lines.append("|---|" + "---|" * n_layers)
    for v in report["variants"][1:]:
        lines.append(f"| {v['variant']} | " + " | ".join(f"{c:.2f}" for c in v["cosine_per_layer_last_position"]) + " |")
    if any(v.get("source") is not None or v.get("quality") for v in report["variants"]):
        lines += ["", "## Refusal direction: source and quality", "",
                  "Selection as Arditi et al. 2024 (bypass = mean refusal log-odds on harmful val with the direction ablated "
                  "everywhere, lower is better; induce = on harmless val with it added at its layer, higher is better; "
                  "KL on harmless val). *own*: the variant's own selected direction in the variant; *original's*: the "
                  "original's selected direction inside the variant; *own in original*: the variant's direction inside the "
                  "original. Quality numbers are measured on one unfiltered validation sample shared by all variants, so they "
                  "differ slightly from the selection's own scores (computed on the prompts each model refuses / answers). "
                  "ASR ablated: vanilla ASR with the original's direction ablated in the variant.", "",
                  "| variant | source (pos, layer) | shift (layers) | cos @ original source | own bypass / induce / KL | original's bypass / induce / KL | own in original: bypass | ASR ablated Wei / Arditi |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in report["variants"]:
            shift = (v.get("source_shift") or {}).get("d_layer")
            q = v.get("quality") or {}
            ab = v.get("asr_original_direction_ablated")
            lines.append(
                f"| {v['variant']} | {_source_text(v)} | "
                f"{'' if shift is None else f'{shift:+d}'} | {v.get('cosine_at_original_source', float('nan')):.3f} | "
                f"{_triple(q.get('own'))} | {_triple(q.get('original_direction'))} | "
                f"{'' if not q.get('own_direction_in_original') else format(q['own_direction_in_original']['bypass'], '.2f')} | "
                f"{_ablated(ab)} |")
        if report.get("figures"):
            lines += ["", "Figures: " + ", ".join(f"[{k}]({p})" for k, p in report["figures"].items())]
    if report.get("repairs"):
        lines += _repair_section(report["repairs"])
    lines += ["", "## Sample completions", ""]
    for v in report["variants"]:
        lines.append(f"### {v['variant']}")
        lines.append("")
        for s in v["samples"]:
            text = s["completion"].strip().replace("\n", " ")
            lines.append(f"- **{s['goal']}** → {text[:300]}{'…' if len(text) > 300 else ''}")
        lines.append("")
    return "\n".join(lines)


def _wall(report: dict) -> str:
    n, total = report.get("invocations", 1), report.get("wall_seconds_all_invocations")
    if n <= 1 or total is None:
        return f"{report['wall_seconds']:.0f} s"
    return (f"{total:.0f} s over {n} invocations of the job (stages done by an earlier one are reused); "
            f"this one {report['wall_seconds']:.0f} s")


def _source_text(v: dict) -> str:
    if v.get("source") is not None:
        return str((v["source"]["position"], v["source"]["layer"]))
    if v.get("source_shift") is None:
        return "not selected (--select-variants)"
    return "none passed the filters"


def _ablated(ab: dict | None) -> str:
    return "" if ab is None else f"{ab['asr']['wei2024']:.1%} / {ab['asr']['arditi2024']:.1%} (n={ab['n_prompts']})"


def _triple(q: dict | None) -> str:
    return "" if not q else f"{q['bypass']:.2f} / {q['induce']:.2f} / {q['kl']:.3f}"


def _zero_shot(z: dict | None) -> str:
    return "-" if not z else f"{z['average']:.1%} (limit {z['limit'] or 'all'})"


def _repair_section(repairs: dict) -> list[str]:
    """One row per repaired variant: AIRD's block and cost, and what it and targeted restoration changed."""
    lines = ["", "## Repair (AIRD and targeted restoration)", "",
             "For each variant whose direction changed at the original's source: AIRD restores the one block before the "
             "source that best brings refusal back (KL <= 0.1 on harmless prompts); targeted restoration brings back only "
             "the weights with the largest attributed effect on refusal, until the refusal rate on harmful val prompts reaches "
             "AIRD's. ASR: vanilla, Arditi judge; per-variant details in `variants/<variant>/repaired/repair.md`.", "",
             "| variant | AIRD block | AIRD restores | ASR compressed / AIRD / targeted | ppl compressed / AIRD | zero-shot compressed / AIRD | cos @ source compressed / AIRD | targeted restores |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, r in repairs.items():
        st = r["states"]
        a = st["aird"]

        def asr(name):
            return f"{st[name]['asr']['vanilla']['arditi2024']:.1%}" if name in st else "-"

        def zs(name):
            z = st[name].get("zero_shot")
            return "-" if not z else f"{z['average']:.1%}"

        t = r.get("targeted") or {}
        targeted = f"{t['k']:,} ({small_pct(t['k'] / a['restored'])} of AIRD)" if t.get("reached") else "target not reached"
        lines.append(f"| {variant} | {r['aird']['layer']} | {a['restored']:,} ({small_pct(a['restored_fraction_of_model'])} of model) | "
                     f"{asr('compressed')} / {asr('aird')} / {asr('targeted')} | {st['compressed']['perplexity']:.2f} / {a['perplexity']:.2f} | "
                     f"{zs('compressed')} / {zs('aird')} | {st['compressed']['cosine_at_source']:.3f} / {a['cosine_at_source']:.3f} | {targeted} |")
    return lines
