"""The evaluation report: Markdown and HTML, a per-layer architecture drawing, a Pareto plot.

The report answers the question Puzzle is judged by: how much of the parent's accuracy each
child keeps at what *measured* speedup, next to the baselines (uniform width, layer dropping,
...) evaluated the same way. The HTML file is standalone (plots embedded).
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

from puzzle.modeling import DeciLMConfig

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PARETO_PNG = "pareto.png"
ARCHITECTURE_PNG = "architecture.png"
PARENT = "parent"
OOD_SPLIT = "eval_ood"

COLUMNS = [
    ("role", "role", "{}"),
    ("parameters", "params (M)", "{:.1f}"),
    ("throughput", "tokens/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("accuracy", "next-token acc.", "{:.4f}"),
    ("accuracy_kept", "acc. kept", "{:.1%}"),
    ("accuracy_kept_ci", "95 % CI", "{}"),
    ("ood_accuracy_kept", "acc. kept, out of domain", "{:.1%}"),
    ("kl_div", "KL(parent‖child)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
    ("top5_agreement", "top-5 agree", "{:.1%}"),
    ("memory_bytes", "memory (MiB)", "{:.1f}"),
]


def _fmt(key: str, fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_ci"):
        return interval(value)
    if key == "parameters":
        value = value / 1e6
    if key == "memory_bytes":
        value = value / 2**20
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def role_of(name: str, row: dict[str, Any]) -> str:
    if name == PARENT:
        return "parent"
    return str(row.get("role") or "child")


def interval(ci: Any) -> str:
    """``[lo, hi]`` as text (``-`` when there is none)."""
    if not ci:
        return "-"
    lo, hi = ci
    return f"{lo:.1%}–{hi:.1%}" if max(abs(lo), abs(hi)) <= 5 else f"{lo:.4g}–{hi:.4g}"


def _ood(row: dict[str, Any]) -> dict[str, Any] | None:
    quality = row.get("quality") or {}
    return quality.get(OOD_SPLIT)


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, row in metrics["models"].items():
        ood = _ood(row) or {}
        row = {**row, "role": role_of(name, row), "ood_accuracy_kept": ood.get("accuracy_kept")}
        if name == PARENT:
            row = {**row, "speedup": 1.0, "accuracy_kept": 1.0}
        rows.append([name] + [_fmt(key, fmt, row.get(key)) for key, _, fmt in COLUMNS])
    return rows


def where(metrics: dict[str, Any]) -> str:
    """The device and workload the headline speedup was measured at."""
    w = metrics["workload"]
    return (
        f"{metrics.get('device_name') or metrics['device']}, batch {w['batch_size']}, prompt "
        f"{w['prompt_len']}, {w['gen_len']} generated tokens"
    )


def headline(metrics: dict[str, Any]) -> list[str]:
    """One sentence per non-baseline child: accuracy kept (with its interval, in and out of domain)
    at the measured speedup, and whether it meets every constraint when measured."""
    lines = []
    for name, row in metrics["models"].items():
        if name == PARENT or role_of(name, row) == "baseline":
            continue
        kept, speed = row.get("accuracy_kept"), row.get("speedup")
        kept_text = (
            f"**{kept:.1%}**"
            if kept is not None
            else "an undefined share (the parent predicts none of the held-out tokens)"
        )
        if row.get("accuracy_kept_ci"):
            kept_text += f" (95 % CI {interval(row['accuracy_kept_ci'])})"
        ood = _ood(row)
        ood_text = ""
        if ood is not None and ood.get("accuracy_kept") is not None:
            ood_text = f", {ood['accuracy_kept']:.1%} out of domain"
            if ood.get("accuracy_kept_ci"):
                ood_text += f" ({interval(ood['accuracy_kept_ci'])})"
        speed_text = f"**{speed:.2f}x**" if speed is not None else "**?x**"
        line = (
            f"**{name}** keeps {kept_text} of the parent's next-token accuracy on held-out text{ood_text} "
            f"at a measured {speed_text} decode throughput ({where(metrics)}); KL(parent‖child) "
            f"{row['kl_div']:.4f}, perplexity {row['perplexity']:.2f} vs the parent's "
            f"{metrics['models'][PARENT]['perplexity']:.2f}."
        )
        checks = row.get("constraints") or []
        if checks:
            missed = [c for c in checks if not c.get("satisfied")]
            line += (
                " It meets every constraint when measured."
                if not missed
                else " It misses " + "; ".join(_miss_text(c) for c in missed) + "."
            )
        lines.append(line)
    return lines


def _miss_text(check: dict[str, Any]) -> str:
    if not check.get("measured"):
        return f"{check['constraint']} (not measured)"
    return f"{check['constraint']} (measured {check['value']:.3g}, {check['shortfall_pct']:.1f} % short)"


def constraint_lines(metrics: dict[str, Any]) -> list[str]:
    """The primary child's constraints against what was measured, as a Markdown table."""
    checks = metrics.get("constraints") or []
    if not checks:
        return []
    lines = [
        "| constraint | batch | measured | bound | met |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        measured = f"{c['value']:.4g}" if c.get("measured") else "not measured"
        bound = f"{c['bound']:.4g}" if c.get("measured") else "-"
        met = "yes" if c.get("satisfied") else f"**no** ({c.get('shortfall_pct', 0):.1f} % short)"
        lines.append(f"| `{c['constraint']}` | {c['batch_size']} | {measured} | {bound} | {met} |")
    return lines


def speed_lines(metrics: dict[str, Any]) -> list[str]:
    """Measured speedup of every model at every evaluated batch size (when there is more than one)."""
    sizes = [str(b) for b in metrics.get("batch_sizes") or []]
    if len(sizes) < 2:
        return []
    lines = ["| model | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for name, row in metrics["models"].items():
        cells = []
        for b in sizes:
            figures = (row.get("speed") or {}).get(b) or {}
            value = figures.get("speedup")
            cells.append(
                "-" if value is None else f"{value:.2f}x ({figures.get('latency', float('nan')):.0f} ms)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def candidate_lines(metrics: dict[str, Any]) -> list[str]:
    """The search's candidates, ranked, with the one chosen as the child."""
    candidates = metrics.get("candidates") or []
    if not candidates:
        return []
    lines = [
        "| candidate | KL (score split) | next-token acc. | predicted speedup | measured speedup "
        "| meets targets | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted(candidates, key=lambda c: (c.get("kl_div") is None, c.get("kl_div") or 0.0)):
        measured = c.get("measured_speedup")
        lines.append(
            f"| #{c['rank']} | {_num(c.get('kl_div'), '{:.4f}')} | {_num(c.get('accuracy'), '{:.4f}')} | "
            f"{_num(c.get('predicted_speedup'), '{:.2f}x')} | {_num(measured, '{:.2f}x')} | "
            f"{'yes' if c.get('meets_targets') else 'no'} | {'**yes**' if c.get('chosen') else ''} |"
        )
    return lines


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def unreachable_lines(metrics: dict[str, Any]) -> list[str]:
    """Baselines that could not reach the target (left out of every comparison at equal speed)."""
    return [
        f"- **{name}** cannot reach the target, so it is not compared: {reason.splitlines()[0]}"
        for name, reason in (metrics.get("unreachable") or {}).items()
    ]


def layer_rows(models: dict[str, DeciLMConfig]) -> tuple[list[str], list[list[str]]]:
    names = list(models)
    depth = max(c.num_hidden_layers for c in models.values())
    rows = []
    for layer in range(depth):
        row = [str(layer)]
        for name in names:
            blocks = models[name].blocks
            row.append(_short(blocks[layer].name) if layer < len(blocks) else "")
        rows.append(row)
    return ["layer", *names], rows


def _short(block: str) -> str:
    attn, _, ffn = block.partition("+")
    return f"{attn.removeprefix('attn_')} / {ffn.removeprefix('ffn_')}"


# --------------------------------------------------------------------------- plots


def plot_pareto(metrics: dict[str, Any], path: Path) -> None:
    """Accuracy kept vs measured speedup of every evaluated model, with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    points = []
    markers = {"parent": ("k", "*"), "baseline": ("tab:gray", "s"), "child": ("tab:blue", "o")}
    for name, row in metrics["models"].items():
        role = role_of(name, row)
        x = 1.0 if name == PARENT else row.get("speedup")
        y = 1.0 if name == PARENT else row.get("accuracy_kept")
        if x is None or y is None:
            continue
        points.append((x, y))
        color, marker = markers.get(role, markers["child"])
        ax.scatter([x], [y], c=color, marker=marker, s=90 if role == "parent" else 55, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = _pareto_front(points)
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="tab:blue", alpha=0.5, zorder=2, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    w = metrics["workload"]
    ax.set_xlabel(f"measured decode speedup vs parent (batch {w['batch_size']}, {w['gen_len']} generated)")
    ax.set_ylabel("next-token accuracy kept (child / parent)")
    ax.set_title(f"Quality vs speed on {metrics.get('device_name') or metrics['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both speed and accuracy, sorted by speed."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_architecture(models: dict[str, DeciLMConfig], path: Path) -> None:
    """One strip per model, one column per layer: attention on top, FFN below.

    Shade = cost relative to the parent's block (KV heads, FFN width); 'L' marks a linear
    replacement; an empty cell is a no-op (the sub-block is skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    parent = models.get(PARENT) or next(iter(models.values()))
    p_blocks = parent.blocks
    names = list(models)
    depth = max(c.num_hidden_layers for c in models.values())
    fig_h = 0.75 * len(names) + 0.9
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * depth + 2.2), fig_h), dpi=110)
    cmap = plt.get_cmap("Blues")
    for row, name in enumerate(names):
        y = (len(names) - 1 - row) * 1.2
        for layer, block in enumerate(models[name].blocks):
            ref = p_blocks[min(layer, len(p_blocks) - 1)]
            for sub, offset in ((block.attention, 0.5), (block.ffn, 0.0)):
                face: str | tuple[float, float, float, float]
                if sub.no_op:
                    face, label = "white", ""
                elif getattr(sub, "linear", False):
                    face, label = cmap(0.35), "L"
                elif hasattr(sub, "num_kv_heads"):
                    if sub.num_kv_heads is None:
                        raise ValueError(f"layer {layer}: attention is neither no-op, linear nor GQA")
                    share = sub.num_kv_heads / max(1, ref.attention.num_kv_heads or sub.num_kv_heads)
                    face, label = cmap(0.25 + 0.7 * share), str(sub.num_kv_heads)
                else:
                    if sub.intermediate_size is None:
                        raise ValueError(f"layer {layer}: FFN is neither no-op, linear nor SwiGLU")
                    share = sub.intermediate_size / max(1, ref.ffn.intermediate_size or sub.intermediate_size)
                    face, label = cmap(0.25 + 0.7 * min(1.0, share)), ""
                ax.add_patch(
                    Rectangle((layer, y + offset), 0.92, 0.46, facecolor=face, edgecolor="0.4", lw=0.5)
                )
                if label:
                    ax.text(
                        layer + 0.46,
                        y + offset + 0.23,
                        label,
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if label != "L" else "black",
                    )
        ax.text(-0.4, y + 0.48, name, ha="right", va="center", fontsize=8)
    ax.set_xlim(-0.2, depth + 0.1)
    ax.set_ylim(-0.2, len(names) * 1.2)
    ax.set_xticks([i + 0.46 for i in range(0, depth, max(1, depth // 15))])
    ax.set_xticklabels([str(i) for i in range(0, depth, max(1, depth // 15))], fontsize=7)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(
        "layer (top cell: attention, number = KV heads, L = linear; bottom: FFN, shade = width; empty = "
        "no-op)",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- documents


def render_markdown(metrics: dict[str, Any], models: dict[str, DeciLMConfig]) -> str:
    lines = ["# Puzzle evaluation", ""]
    lines += headline(metrics) or ["No child to summarise."]
    lines += ["", data_line(metrics), ""]
    if metrics.get("unreachable"):
        lines += unreachable_lines(metrics) + [""]
    lines += [
        "## Models",
        "",
        "| model | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(metrics)]
    for title, extra in (
        ("Constraints, measured", constraint_lines(metrics)),
        ("Speed at every searched workload", speed_lines(metrics)),
        ("Candidates of the search", candidate_lines(metrics)),
    ):
        if extra:
            lines += ["", f"## {title}", ""] + extra
    lines += ["", f"![accuracy kept vs measured speedup]({PARETO_PNG})", "", "## Architecture per layer", ""]
    lines += [f"![per-layer architecture]({ARCHITECTURE_PNG})", ""]
    header, rows = layer_rows(models)
    lines += ["Each cell: attention / FFN (`kvN` = GQA with N KV heads, a number = FFN width).", ""]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def data_line(metrics: dict[str, Any]) -> str:
    """What quality and speed were measured on."""
    splits = metrics.get("splits") or {}
    parts = [
        f"`{name}` ({info['sequences']} sequences of {info['seq_len']} tokens)"
        for name, info in splits.items()
    ]
    text = "Quality on " + (" and ".join(parts) if parts else f"{metrics['tokens']:,} held-out tokens")
    text += (
        f" (95 % intervals: bootstrap over sequences); headline speed measured on {where(metrics)}"
        + (
            f", also at batch sizes {metrics['batch_sizes']}"
            if len(metrics.get("batch_sizes") or []) > 1
            else ""
        )
        + "."
    )
    return text


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _bold(text: str) -> str:
    while text.count("**") >= 2:
        text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return text


def _html_table(lines: list[str]) -> str:
    """A Markdown table (header, rule, rows) as HTML."""
    esc = html.escape

    def cells(line: str) -> list[str]:
        return [c.strip().strip("`") for c in line.strip().strip("|").split("|")]

    head, *rows = [cells(line) for i, line in enumerate(lines) if i != 1]
    out = "<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{_bold(esc(c))}</td>" for c in row) + "</tr>"
    return out + "</table>"


def render_html(metrics: dict[str, Any], models: dict[str, DeciLMConfig], directory: Path) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Puzzle evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px "
        "7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head><body>",
        "<h1>Puzzle evaluation</h1>",
    ]
    for line in headline(metrics):
        parts.append(f"<p>{_bold(esc(line))}</p>")
    parts.append(
        "<h2>Models</h2><table><tr><th>model</th>"
        + "".join(f"<th>{esc(lbl)}</th>" for _, lbl, _ in COLUMNS)
        + "</tr>"
    )
    for row in table_rows(metrics):
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    parts.append(f"<p>{esc(data_line(metrics))}</p>")
    unreachable = unreachable_lines(metrics)
    if unreachable:
        parts.append("<ul>" + "".join(f"<li>{_bold(esc(line[2:]))}</li>" for line in unreachable) + "</ul>")
    for title, extra in (
        ("Constraints, measured", constraint_lines(metrics)),
        ("Speed at every searched workload", speed_lines(metrics)),
        ("Candidates of the search", candidate_lines(metrics)),
    ):
        if extra:
            parts.append(f"<h2>{esc(title)}</h2>" + _html_table(extra))
    for name in (PARETO_PNG, ARCHITECTURE_PNG):
        if (directory / name).exists():
            parts.append(f"<p>{_img(directory / name)}</p>")
    header, rows = layer_rows(models)
    parts.append(
        "<h2>Architecture per layer</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    )
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"


def write_report(directory: Path, metrics: dict[str, Any], *, models: dict[str, DeciLMConfig]) -> None:
    """Write ``report.md``, ``report.html``, ``pareto.png`` and ``architecture.png`` into ``directory``."""
    plot_pareto(metrics, directory / PARETO_PNG)
    plot_architecture(models, directory / ARCHITECTURE_PNG)
    (directory / REPORT_MD).write_text(render_markdown(metrics, models))
    (directory / REPORT_HTML).write_text(render_html(metrics, models, directory))
    log.info("report written to %s", directory / REPORT_MD)
