"""Per-token compute view: how many FFN experts each token used, layer by layer (report App. A.1, Table 8).

With zero-computation experts a token's compute depends on how many of its K routed slots landed on FFN experts
(report §2.1). `longcat explain` runs one forward over a text, reads the router's choices (`RoutingInfo.ids`) in every
ScMoE layer and writes three views into `--out`:

  explain.json   ids, text spans, classes, counts (L, T) in [max(K - Z, 0), min(K, E)], the FFN experts themselves
                 (L, T, count), per-token layer averages, statistics
  explain.html   self-contained: one coloured row of tokens per layer plus an average row, a legend, tooltips
  explain.png    heatmap layers x tokens above a one-row heatmap of the averages, wrapped into panels of up to
                 64 tokens like a paragraph (needs matplotlib, the [plot] extra; skipped with a note without it)

Layer i is `model.layers.{i}` of the checkpoint (0-based; the report's "layer 1" is our layer 0).

Token text spans come from incremental decoding (see `token_spans`), so they concatenate back to the input.
Token classes, decided on the span with surrounding whitespace removed, checked in this order:
  whitespace   the span is whitespace only
  digits       every character is a decimal digit ("7", " 2024")
  punctuation  every character is Unicode punctuation (category P*) or ASCII punctuation/symbol ("(", " +=", ".")
  identifiers  letters, digits and "_" only, with at least one letter ("the", " __init__", "x1", "你好")
  other        anything else: mixed spans ("):x", "'s"), emoji, the leading bytes of a multi-byte character
Class statistics are over tokens, of each token's average over layers; std is the population std (ddof=0).

Shapes: L ScMoE layers, T tokens, K top-k (moe_topk), Z zero experts.
"""
from __future__ import annotations

import functools
import html
import json
import math
import statistics
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.hf import LongcatFlash, model_directory
from ..config import ModelConfig
from ..device import model_device
from ..infer.loader import inference_device
from ..tokenizer import TOKENIZER_FILE, Tokenizer

CLASSES = ("punctuation", "digits", "identifiers", "whitespace", "other")
CLASS_RULES = {
    "punctuation": "every non-space character is Unicode punctuation (P*) or ASCII punctuation/symbol",
    "digits": "every non-space character is a decimal digit",
    "identifiers": "letters, digits and '_' only, at least one letter (words and code identifiers)",
    "whitespace": "whitespace only",
    "other": "anything else: mixed spans, emoji, leading bytes of a multi-byte character",
}
FILES = ("explain.json", "explain.html", "explain.png")
PANEL_TOKENS, MAX_PANELS = 64, 8  # PNG: tokens per wrapped panel, and at most this many panels
# viridis at 0, 1/4, 1/2, 3/4, 1: the HTML uses the same scale as the PNG without importing matplotlib
_VIRIDIS = ((0x44, 0x01, 0x54), (0x3B, 0x52, 0x8B), (0x21, 0x91, 0x8C), (0x5E, 0xC9, 0x62), (0xFD, 0xE7, 0x25))


# ---------------------------------------------------------------------------------------------- the numbers

@dataclass(frozen=True)
class Explanation:
    """One forward's per-token FFN-expert counts with the token texts and classes they are shown with."""

    ids: list[int]  # (T,)
    spans: list[str]  # (T,) text each token adds; "".join(spans) is the decoded text
    classes: list[str]  # (T,) one of CLASSES
    counts: list[list[int]]  # (L, T) FFN experts used, in [max(K - Z, 0), min(K, E)]
    experts: list[list[list[int]]]  # (L, T, counts[l][t]) which: the FFN expert ids, ascending
    moe_topk: int
    n_routed_experts: int
    zero_expert_num: int

    @functools.cached_property
    def average(self) -> list[float]:
        """(T,) each token's FFN experts averaged over layers: its relative compute across the whole trunk."""
        return [sum(column) / len(self.counts) for column in zip(*self.counts)]

    def class_stats(self) -> dict[str, dict[str, Any]]:
        """Per class: token count, mean and population std of the per-token averages (None when empty)."""
        by_class: dict[str, list[float]] = {name: [] for name in CLASSES}
        for cls, value in zip(self.classes, self.average):
            by_class[cls].append(value)
        return {name: _summary(values) for name, values in by_class.items()}

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per layer: mean and std over tokens, the report's Fig. 3(b)/(c) diagnostics for this text."""
        return [{"layer": i, **_summary([float(c) for c in row])} for i, row in enumerate(self.counts)]

    def to_dict(self) -> dict[str, Any]:
        """The content of explain.json: inputs, counts (L, T), the experts themselves (L, T, count), averages (T,)
        and the statistics."""
        return {
            "moe_topk": self.moe_topk, "n_routed_experts": self.n_routed_experts,
            "zero_expert_num": self.zero_expert_num, "num_layers": len(self.counts), "num_tokens": len(self.ids),
            "tokens": [{"index": i, "id": t, "text": s, "class": c}
                       for i, (t, s, c) in enumerate(zip(self.ids, self.spans, self.classes))],
            "counts": self.counts, "experts": self.experts, "average": self.average,
            "layers": self.layer_stats(), "classes": self.class_stats(), "class_rules": CLASS_RULES,
        }


def _summary(values: list[float]) -> dict[str, Any]:
    """count, mean, population std; None for an empty class so JSON shows "no tokens" rather than a fake 0."""
    if not values:
        return {"count": 0, "mean": None, "std": None}
    return {"count": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def classify(span: str) -> str:
    """The token class of a decoded span (rules in the module docstring and CLASS_RULES)."""
    core = span.strip()
    if not span:
        return "other"  # a leading byte of a character another token completes
    if not core:
        return "whitespace"
    if all(c.isdecimal() for c in core):
        return "digits"
    if all(c in string.punctuation or unicodedata.category(c).startswith("P") for c in core):
        return "punctuation"
    if all(c.isalnum() or c == "_" for c in core) and any(c.isalpha() for c in core):
        return "identifiers"
    return "other"


def token_spans(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, such that "".join(spans) == tokenizer.decode(ids).

    Decoding ids one at a time would turn a character split over two byte-level tokens into two replacement
    characters. Instead, as incremental detokenizers do, decode a short window that starts at the previous
    emitted token (context for decoders that treat a leading space specially) and emit the new text once it no
    longer ends in an incomplete character: the tokens holding a character's leading bytes get "", the token
    completing it gets the character. A literal U+FFFD in the text looks the same as an incomplete character, so
    it is attributed to the token after it; the concatenation stays exact.
    """
    spans: list[str] = []
    prefix = read = 0  # ids[prefix:read] is already emitted; it is decoded again only as context
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=False)
        if after.endswith("\ufffd") and i + 1 < len(ids):
            spans.append("")
            continue
        spans.append(after[len(before):])
        prefix, read = read, i + 1
    return spans


@torch.inference_mode()
def ffn_experts_per_layer(model: LongcatFlash, ids: Sequence[int]) -> list[list[list[int]]]:
    """(L, T, count) the FFN experts each token used in each ScMoE layer, ids ascending, from one forward without
    logits."""
    out = model(torch.tensor([list(ids)], device=model_device(model)), compute_logits=False)  # ids (1, T)
    return [[sorted(e for e in row if e < info.n_ffn) for row in info.ids.tolist()] for info in out.routing]


def explain(model_dir: str | Path, text: str, device: str | torch.device = "auto") -> Explanation:
    """Tokenize `text`, check it fits the model, run it on `device` and collect the counts.

    Everything cheap is checked before the weights are read, so a bad input fails in milliseconds.
    """
    if not text:
        raise ValueError("the text to explain is empty; pass --text with at least one character")
    device = inference_device(device)
    path = model_directory(model_dir)
    if not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}: explain needs the tokenizer saved beside the "
                                "checkpoint (Tokenizer.save(dir))")
    tokenizer, cfg = Tokenizer.load(path), ModelConfig.from_json(path)
    ids = tokenizer.encode(text)
    _check_text_fits(ids, cfg)
    experts = ffn_experts_per_layer(LongcatFlash.from_pretrained(path, device=device), ids)
    spans = token_spans(tokenizer, ids)
    return Explanation(ids=ids, spans=spans, classes=[classify(s) for s in spans],
                       counts=[[len(used) for used in layer] for layer in experts], experts=experts,
                       moe_topk=cfg.moe_topk, n_routed_experts=cfg.n_routed_experts,
                       zero_expert_num=cfg.zero_expert_num)


def _check_text_fits(ids: list[int], cfg: ModelConfig) -> None:
    """The text must give at least one token, fit the context, and its ids the model's embedding table."""
    if not ids:
        raise ValueError("the text encodes to no tokens; pass --text with visible content")
    if len(ids) > cfg.max_position_embeddings:
        raise ValueError(f"the text is {len(ids)} tokens, longer than the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}; shorten it")
    if max(ids) >= cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {max(ids)}, outside the model's vocab_size={cfg.vocab_size}: "
                         "tokenizer.json does not belong to this checkpoint")


# ---------------------------------------------------------------------------------------------- the views

def write_json(expl: Explanation, path: Path) -> None:
    """UTF-8 with the token texts unescaped, so the file reads as the text it describes."""
    path.write_text(json.dumps(expl.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _colour(value: float, vmax: int) -> tuple[str, str]:
    """Background on the viridis scale for value in [0, vmax], and a text colour that stays readable on it."""
    x = min(max(value / vmax if vmax else 0.0, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    lo = min(int(x), len(_VIRIDIS) - 2)
    rgb = [round(a + (b - a) * (x - lo)) for a, b in zip(_VIRIDIS[lo], _VIRIDIS[lo + 1])]
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return "#{:02x}{:02x}{:02x}".format(*rgb), "#000" if luminance > 0.5 else "#fff"


def _visible(span: str) -> str:
    """Show control whitespace as symbols so a row stays one line; "…" marks a partial character."""
    return span.replace("\n", "↵").replace("\t", "→").replace("\r", "␍") if span else "…"


def _cell(span: str, value: float, vmax: int, tip: str) -> str:
    """One coloured token; both the text and the tooltip are escaped (the text may hold markup)."""
    bg, fg = _colour(value, vmax)
    return (f'<span class="t" style="background:{bg};color:{fg}" title="{html.escape(tip)}">'
            f"{html.escape(_visible(span))}</span>")


def _token_label(expl: Explanation, t: int) -> str:
    """Tooltip header; the span is JSON-quoted so whitespace and quotes inside it stay visible."""
    return f"token {t} {json.dumps(expl.spans[t], ensure_ascii=False)} (id {expl.ids[t]}, {expl.classes[t]})"


def _html_rows(expl: Explanation) -> list[str]:
    """One table row per layer plus the average row; per-layer tooltips name the layer, the average row lists all."""
    k, rows = expl.moe_topk, []
    for layer, row in enumerate(expl.counts):
        cells = "".join(_cell(s, c, k, f"{_token_label(expl, t)}\nlayer {layer}: {c} of {k} slots on FFN experts")
                        for t, (s, c) in enumerate(zip(expl.spans, row)))
        rows.append(f'<tr><th>layer {layer}</th><td class="toks">{cells}</td></tr>')
    cells = "".join(
        _cell(s, avg, k, f"{_token_label(expl, t)}\nper layer: {' '.join(str(r[t]) for r in expl.counts)}"
                         f"\naverage: {avg:.2f}")
        for t, (s, avg) in enumerate(zip(expl.spans, expl.average)))
    rows.append(f'<tr class="avg"><th>average</th><td class="toks">{cells}</td></tr>')
    return rows


def _html_tables(expl: Explanation) -> str:
    """The class and layer statistics as small tables under the token rows."""
    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    classes = "".join(f"<tr><td>{n}</td><td>{s['count']}</td><td>{fmt(s['mean'])}</td><td>{fmt(s['std'])}</td>"
                      f"<td>{html.escape(CLASS_RULES[n])}</td></tr>" for n, s in expl.class_stats().items())
    layers = "".join(f"<tr><td>{s['layer']}</td><td>{fmt(s['mean'])}</td><td>{fmt(s['std'])}</td></tr>"
                     for s in expl.layer_stats())
    return ("<h2>By token class</h2><table class=\"stats\"><tr><th>class</th><th>tokens</th><th>mean</th>"
            f"<th>std</th><th>rule</th></tr>{classes}</table>"
            "<h2>By layer</h2><table class=\"stats\"><tr><th>layer</th><th>mean</th><th>std</th></tr>"
            f"{layers}</table>")


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:110em}
table.rows{border-collapse:collapse}table.rows th{text-align:right;padding:.3em .6em;white-space:nowrap;
vertical-align:top;font-weight:normal;color:#444}tr.avg th{font-weight:bold}tr.avg td{border-top:2px solid #444}
td.toks{padding:.25em 0;line-height:1.9}.t{white-space:pre;font-family:monospace;padding:.1em 0;
border-right:1px solid #fff}.legend span{display:inline-block;min-width:2.2em;text-align:center;
font-family:monospace;padding:.2em}table.stats{border-collapse:collapse}
table.stats td,table.stats th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"""


def write_html(expl: Explanation, path: Path) -> None:
    """A single self-contained file (inline CSS, no scripts); every piece of input text is escaped."""
    k = expl.moe_topk
    legend = "".join(f'<span style="background:{bg};color:{fg}">{v}</span>'
                     for v in range(k + 1) for bg, fg in [_colour(v, k)])
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>longcat explain</title><style>{_CSS}</style>'
        f"</head><body><h1>FFN experts per token</h1><p>{len(expl.ids)} tokens, {len(expl.counts)} ScMoE layers. "
        f"Each token picks top-{k} of {expl.n_routed_experts} FFN experts + {expl.zero_expert_num} zero experts; "
        f"the colour is how many of its {k} slots went to FFN experts (its compute), the last row the mean over "
        "layers. Hover a token for its numbers. ↵ newline, → tab, … part of a multi-byte character.</p>"
        f'<p class="legend">FFN experts: {legend}</p>'
        f'<table class="rows">{"".join(_html_rows(expl))}</table>{_html_tables(expl)}</body></html>\n')
    path.write_text(page, encoding="utf-8")


def _panels(n_tokens: int) -> list[range]:
    """Token ranges of the PNG's panels: the text wraps like a paragraph, so a long text stays legible.

    PANEL_TOKENS per panel keeps one label per token; past MAX_PANELS panels grow wider and labels thin out.
    """
    n = min(math.ceil(n_tokens / PANEL_TOKENS), MAX_PANELS)
    width = math.ceil(n_tokens / n)
    return [range(start, min(start + width, n_tokens)) for start in range(0, n_tokens, width)]


def _drawable(labels: list[str]) -> list[str]:
    """Spell characters the monospace font has no glyph for (CJK, emoji) as U+XXXX instead of blank boxes."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(font_manager.FontProperties(family="monospace")))
    return ["".join(c if font.get_char_index(ord(c)) else f"U+{ord(c):04X}" for c in label) for label in labels]


def write_png(expl: Explanation, path: Path) -> None:
    """Per panel of tokens: a heatmap of counts (layers x tokens) above a one-row heatmap of the averages, all on
    one 0..K colour scale with one colour bar.

    Uses the Agg canvas through `matplotlib.figure.Figure` (no pyplot, no global backend switch).
    """
    from matplotlib.figure import Figure

    L, k, panels = len(expl.counts), expl.moe_topk, _panels(len(expl.ids))
    width, row_height = len(panels[0]), min(0.3, max(0.12, 2.4 / (L + 1)))  # inches per layer row
    average_rows = max(1.3, L / 6)  # the average row's height in layer rows: visible however many layers
    height = 1.2 + len(panels) * (row_height * (L + average_rows) + 0.9)
    fig = Figure(figsize=(max(7.0, 2.5 + 0.2 * min(width, PANEL_TOKENS)), height), dpi=110, layout="constrained")
    axes = fig.subplots(2 * len(panels), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [L, average_rows] * len(panels)})
    for i, tokens in enumerate(panels):
        image = _draw_panel(axes[2 * i, 0], axes[2 * i + 1, 0], expl, tokens, width,
                            annotate=row_height >= 0.2 and width <= PANEL_TOKENS)  # numbers only where they fit
    fig.suptitle(f"FFN experts per token (top-{k} over {expl.n_routed_experts} FFN + "
                 f"{expl.zero_expert_num} zero experts)")
    fig.colorbar(image, ax=list(axes[:, 0]), location="top", ticks=range(k + 1), label="FFN experts used",
                 shrink=0.6, aspect=25, fraction=0.5 / height, pad=0.2 / height)  # inches, whatever the height
    fig.savefig(path)


def _draw_panel(top: Any, bottom: Any, expl: Explanation, tokens: range, width: int, annotate: bool) -> Any:
    """One panel; every panel spans `width` cells so cells line up across panels even when the last is short."""
    L, k = len(expl.counts), expl.moe_topk
    counts = [row[tokens.start:tokens.stop] for row in expl.counts]  # (L, panel tokens)
    average = [expl.average[tokens.start:tokens.stop]]  # (1, panel tokens)
    style = {"aspect": "auto", "cmap": "viridis", "vmin": 0, "vmax": k, "interpolation": "nearest"}
    image = top.imshow(counts, **style)
    bottom.imshow(average, **style)
    step = math.ceil(L / 16)
    top.set_yticks(range(0, L, step), [f"layer {i}" for i in range(0, L, step)], fontsize=8)
    top.set_xticks([])
    bottom.set_yticks([0], ["average"], fontsize=8)
    label_step = math.ceil(len(tokens) / PANEL_TOKENS)
    ticks = list(range(0, len(tokens), label_step))
    labels = _drawable([_visible(expl.spans[tokens.start + t]).replace(" ", "␣") for t in ticks])
    bottom.set_xticks(ticks, labels, rotation=90, fontsize=8, fontfamily="monospace", parse_math=False)
    for ax in (top, bottom):
        ax.set_xlim(-0.5, width - 0.5)
    if annotate:
        _annotate(top, counts, k, "{:d}")
        _annotate(bottom, average, k, "{:.1f}")
    return image


def _annotate(ax: Any, rows: list[list[Any]], vmax: int, fmt: str) -> None:
    """Write each cell's value in it, in the text colour the HTML uses for that background."""
    for y, row in enumerate(rows):
        for x, value in enumerate(row):
            ax.text(x, y, fmt.format(value), ha="center", va="center", fontsize=6, color=_colour(value, vmax)[1])


# ---------------------------------------------------------------------------------------------- the command

def format_summary(expl: Explanation, written: list[Path], skipped: str | None) -> str:
    """The table `longcat explain` prints: tokens, mean and std of FFN experts per class, then the files."""
    fewest = max(expl.moe_topk - expl.zero_expert_num, 0)  # the top-k holds at most Z zero experts
    most = min(expl.moe_topk, expl.n_routed_experts)  # and at most every FFN expert
    tokens, layers = len(expl.ids), len(expl.counts)
    lines = [f"{tokens} token{'s' * (tokens != 1)}, {layers} layer{'s' * (layers != 1)}, FFN experts per token per "
             f"layer in [{fewest}, {most}] (mean over layers, then over the class's tokens)",
             f"{'class':<12} {'tokens':>6} {'mean':>6} {'std':>6}"]
    everything = _summary(expl.average)
    for name, s in [*expl.class_stats().items(), ("all", everything)]:
        mean, std = ("-", "-") if s["mean"] is None else (f"{s['mean']:.2f}", f"{s['std']:.2f}")
        lines.append(f"{name:<12} {s['count']:>6} {mean:>6} {std:>6}")
    lines.append("per layer: " + "  ".join(f"{s['layer']}:{s['mean']:.2f}" for s in expl.layer_stats()))
    lines += [f"wrote {p}" for p in written]
    if skipped:
        lines.append(skipped)
    return "\n".join(lines)


def write_views(expl: Explanation, out: str | Path) -> tuple[list[Path], str | None]:
    """Write the JSON and HTML, and the PNG when matplotlib is installed (else say why it was skipped)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path, png_path = (out / name for name in FILES)
    write_json(expl, json_path)
    write_html(expl, html_path)
    try:
        write_png(expl, png_path)
    except ImportError:
        png_path.unlink(missing_ok=True)  # an earlier run's picture, of another text
        return [json_path, html_path], "skipped explain.png: matplotlib is not installed (pip install matplotlib)"
    return [json_path, html_path, png_path], None


def explain_command(model_dir: str | Path, text: str, out: str | Path, as_json: bool = False,
                    device: str = "auto") -> str:
    """What `longcat explain` prints: the summary table and paths, or one JSON object with `as_json`."""
    expl = explain(model_dir, text, device)
    written, skipped = write_views(expl, out)
    if as_json:
        return json.dumps({**expl.to_dict(), "files": [str(p) for p in written], "skipped": skipped},
                          ensure_ascii=False)
    return format_summary(expl, written, skipped)
