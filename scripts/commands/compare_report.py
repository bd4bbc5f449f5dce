"""What `invoke compare` reports: one :class:`Row` per precision (plus the PyTorch original), the pure figures
computed from worker results (perplexity, agreement), and the renderings (markdown table, SVG plot, files). Pure
except :func:`write_outputs`."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from scripts.core.fileops import write_text_atomic
from scripts.core.evalset import normalise_answer
from scripts.recipe.precisions import TUTORIAL_CLAIMS

HF_ROW = "hf-fp32"


@dataclass
class Row:
    """One precision (or the Hugging Face original, ``hf-fp32``)."""

    precision: str
    status: str  # ok | refused | failed
    reason: str = ""
    folder: str = ""
    bytes: int | None = None
    graph: str = ""
    weights_by_type: str = ""
    load_seconds: float | None = None
    ttft: dict | None = None  # Summary.to_json() in seconds
    decode_tps: dict | None = None
    peak_rss_mb: float | None = None
    eval_accuracy: float | None = None
    answers: list[str] = field(default_factory=list)
    answer_agreement_fp32: float | None = None
    token_agreement_fp32: float | None = None
    token_agreement_torch: float | None = None
    perplexity: float | None = None
    kld_mean: float | None = None  # vs FP32 ONNX, per token, on held-out text (scripts/proof/fidelity.py)
    kld_p99: float | None = None
    ppl_increase: float | None = None  # ΔPPL vs FP32 ONNX, as a fraction
    tool_calls: float | None = None  # eval.tools held-out: calls exact (name + JSON-equal arguments)
    tool_no_call: float | None = None  # eval.tools held-out: no-call questions answered in text
    tool_results_read: float | None = None  # eval.tools held-out agent loops: every result value read back

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class CompareReport:
    recipe: str
    quality_measured: bool
    quality_note: str
    hf_bytes: int
    rows: list[Row]
    profile: dict
    smallest: dict | None = None  # the smallest precision that qualifies, and why (compare's judgement)
    files: dict = field(default_factory=dict)

    def row(self, precision: str) -> Row | None:
        return next((r for r in self.rows if r.precision == precision), None)

    def ratio(self, row: Row, to: str) -> float | None:
        base = self.hf_bytes if to == HF_ROW else (self.row("fp32").bytes if self.row("fp32") else None)
        return row.bytes / base if row.bytes and base else None

    def to_json(self) -> dict:
        d = asdict(self)
        for r, rd in zip(self.rows, d["rows"]):
            rd["ratio_fp32"], rd["ratio_hf"] = self.ratio(r, "fp32"), self.ratio(r, HF_ROW)
            rd["tutorial_ratio"] = TUTORIAL_CLAIMS.get(r.precision, (None,))[0]
        return d


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def perplexity(result: dict) -> float:
    nll = [x for w in result["windows"] for x in w["nll"]]
    return math.exp(sum(nll) / len(nll))


def token_agreement(a: dict, b: dict) -> float:
    """Share of positions where two models' greedy next tokens agree (teacher-forced on the same text)."""
    pairs = [(x, y) for wa, wb in zip(a["windows"], b["windows"]) for x, y in zip(wa["argmax"], wb["argmax"])]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else 0.0


def answer_agreement(answers: Sequence[str], reference: Sequence[str]) -> float:
    pairs = list(zip(answers, reference))
    return sum(normalise_answer(a) == normalise_answer(b) for a, b in pairs) / len(pairs) if pairs else 0.0


def fmt_mb(n: int | None) -> str:
    return f"{n / 1e6:,.1f}" if n else "–"


def _x(r: float | None) -> str:
    return f"{r:.3f}×" if r is not None else "–"


def fmt_pct(x: float | None) -> str:
    return f"{100 * x:.1f} %" if x is not None else "–"


def fmt_median(summary: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not summary:
        return "–"
    return f"{summary['median'] * scale:.{digits}f} ±{50 * summary.get('spread', 0):.0f}%"


def _short(reason: str) -> str:
    """The first clause of a refusal/failure (the full text is listed under the table)."""
    first = reason.strip().splitlines()[0] if reason.strip() else ""
    return first.split(": ")[0][:120] + (" (see below)" if len(reason) > len(first.split(": ")[0]) else "")


def markdown_table(report: CompareReport) -> str:
    """The tutorial's table, measured: its claimed size ratio beside ours, then speed and quality."""
    q = report.quality_measured
    head = ["precision", "tutorial: size", "tutorial: speed / quality", "size MB", "× FP32", "× HF original",
            "load s", "TTFT ms", "decode tok/s", "peak RSS MB"]
    tools = q and any(r.tool_calls is not None for r in report.rows)
    reads = tools and any(r.tool_results_read is not None for r in report.rows)
    if q:
        head += ["eval accuracy", "answers = FP32", "top-1 = FP32 ONNX", "KLD mean / p99", "ΔPPL", "perplexity",
                 "tokens = PyTorch"] + ([f"tool calls exact / no call in text{' / results read' if reads else ''}"]
                                        if tools else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        ratio, speed, quality = TUTORIAL_CLAIMS.get(r.precision, (None, "", ""))
        label = "HF original (PyTorch FP32)" if r.precision == HF_ROW else r.precision.upper()
        claim = f"× {ratio:g}" if ratio else "–"
        if not r.ok:
            cells = [label, claim, f"{speed} / {quality}" if speed else "–",
                     f"**{r.status}**: {_short(r.reason)}"] + [""] * (len(head) - 4)
        else:
            cells = [label, claim, f"{speed} / {quality}" if speed else "–", fmt_mb(r.bytes),
                     _x(report.ratio(r, "fp32")), _x(report.ratio(r, HF_ROW)),
                     f"{r.load_seconds:.2f}" if r.load_seconds is not None else "–", fmt_median(r.ttft, 1000, 0),
                     fmt_median(r.decode_tps), f"{r.peak_rss_mb:,.0f}" if r.peak_rss_mb else "–"]
            if q:
                kld = f"{r.kld_mean:.4f} / {r.kld_p99:.3f}" if r.kld_mean is not None else "–"
                dppl = f"{100 * r.ppl_increase:+.1f} %" if r.ppl_increase is not None else "–"
                cells += [fmt_pct(r.eval_accuracy), fmt_pct(r.answer_agreement_fp32), fmt_pct(r.token_agreement_fp32),
                          kld, dppl, f"{r.perplexity:.3f}" if r.perplexity else "–", fmt_pct(r.token_agreement_torch)]
                if tools:
                    cells.append(f"{fmt_pct(r.tool_calls)} / {fmt_pct(r.tool_no_call)}"
                                 + (f" / {fmt_pct(r.tool_results_read)}" if reads else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def svg_plot(report: CompareReport) -> str:
    """Size (x, MB, log scale) vs decode speed (y); the label carries quality. Plain SVG, no plotting library."""
    pts = [r for r in report.rows if r.ok and r.bytes and r.decode_tps]
    w, h, pad = 640, 400, 60
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><text x="20" y="40">no data</text></svg>'
    xs = [math.log10(r.bytes / 1e6) for r in pts]
    ys = [r.decode_tps["median"] for r in pts]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    y1 = max(ys) * 1.15
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad - y / y1 * (h - 2 * pad)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{report.recipe}: size vs decode speed vs '
           f'quality</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">artifact size, MB (log scale)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">decode tokens/s '
           f'(median)</text>']
    for r, x, y in zip(pts, xs, ys):
        quality = (f"acc {fmt_pct(r.eval_accuracy)}, ppl {r.perplexity:.2f}" if report.quality_measured and r.perplexity
                   else "quality n/a")
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="#3366cc"/>')
        right = sx(x) > w / 2  # label towards the middle so it stays inside the picture
        out.append(f'<text x="{sx(x) + (-9 if right else 9):.1f}" y="{sy(y) - 8:.1f}" '
                   f'text-anchor="{"end" if right else "start"}">{r.precision} ({10 ** x:,.1f} MB, {y:.1f} tok/s; '
                   f'{quality})</text>')
    out.append("</svg>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def write_outputs(report: CompareReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "compare.json", "markdown": out_dir / "compare.md", "plot": out_dir / "compare.svg"}
    report.files = {k: str(v) for k, v in files.items()}
    md = [f"# {report.recipe}: every precision, measured", "",
          "Sizes are weight files (ONNX model + external data; safetensors for the original). Speed: medians of "
          f"{report.profile['repeats']} runs after {report.profile['warmup']} warm-up at a ~{report.profile['lengths'][0]}-"
          f"token prompt, {report.profile['new_tokens']} new tokens, on a shared machine (± = half the interquartile "
          "range): compare ratios, not absolutes.", ""]
    if report.quality_note:
        md += [f"**{report.quality_note}.**", ""]
    md += [markdown_table(report), ""]
    md += [f"- {r.precision}: {r.graph}; weights {r.weights_by_type}" for r in report.rows if r.ok and r.weights_by_type]
    md += [f"- {r.precision} {r.status}: {r.reason}" for r in report.rows if not r.ok]
    if report.smallest:
        md += ["", f"Smallest precision that qualifies: **{report.smallest['chosen']}** (eval accuracy ≥ "
                   f"{100 * report.smallest['threshold']:.0f} % of FP32's, fidelity thresholds met):"]
        md += [f"- {line}" for line in report.smallest["reasons"]]
    write_text_atomic(files["markdown"], "\n".join(md) + "\n")
    write_text_atomic(files["json"], json.dumps(report.to_json(), indent=2, default=str) + "\n")
    write_text_atomic(files["plot"], svg_plot(report) + "\n")
