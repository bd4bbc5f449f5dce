"""`invoke compare`: every precision of the tutorial's table, built from one recipe and measured side by side.

Each precision is built by the normal steps (convert → package, which includes the GenAI smoke test) in its own
folder ``build/<recipe>/precisions/<p>/`` with its own stamps, so re-running reuses the builds. Then, per build,
one worker process per backend (``scripts/measure.py``):

- Foundry Local (as deployed): load time, time to first token, decode tokens/s, peak RSS, and the eval-set answers;
- ONNX Runtime GenAI on the same folder: teacher-forced logits over held-out text (perplexity, greedy-token
  agreement with the FP32 ONNX build and with the original PyTorch model);
- PyTorch on the Hugging Face original: the same figures, as the reference row.

Speed figures are medians of repeated runs on a shared machine: compare ratios, not absolutes. Models made from a
config with random weights (``synthetic:`` sources) get sizes and speeds only: their quality figures would be noise.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.errors import ConversionError, GraphCheckError, MeasurementError, RecipeError, SlmopsError
from scripts.fileops import write_text_atomic
from scripts.proof.measure import Profile
from scripts.recipe.precisions import BY_SIZE, PRECISIONS, TUTORIAL_CLAIMS, choose_auto, refusal
from scripts.recipe.load import Recipe

log = logging.getLogger(__name__)
Announce = Callable[[str], None]

#: One prompt length, short runs: enough to rank precisions; `invoke bench` has the full profile.
COMPARE_PROFILE = Profile("compare", lengths=(128,), max_prompt_tokens=128, new_tokens=32, warmup=1, repeats=3)
WINDOW_TOKENS = 256
MAX_HELDOUT_TOKENS = 1024
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
    auto: dict | None = None
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


def windows(ids: Sequence[int], size: int = WINDOW_TOKENS, limit: int = MAX_HELDOUT_TOKENS) -> list[list[int]]:
    """Consecutive windows of at most ``size`` tokens over the first ``limit`` ids (windows shorter than 2 dropped)."""
    ids = list(ids)[:limit]
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 2]


def perplexity(result: dict) -> float:
    nll = [x for w in result["windows"] for x in w["nll"]]
    return math.exp(sum(nll) / len(nll))


def token_agreement(a: dict, b: dict) -> float:
    """Share of positions where two models' greedy next tokens agree (teacher-forced on the same text)."""
    pairs = [(x, y) for wa, wb in zip(a["windows"], b["windows"]) for x, y in zip(wa["argmax"], wb["argmax"])]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else 0.0


def answer_agreement(answers: Sequence[str], reference: Sequence[str]) -> float:
    from scripts.proof.qa import normalise_answer
    pairs = list(zip(answers, reference))
    return sum(normalise_answer(a) == normalise_answer(b) for a, b in pairs) / len(pairs) if pairs else 0.0


def _mb(n: int | None) -> str:
    return f"{n / 1e6:,.1f}" if n else "–"


def _x(r: float | None) -> str:
    return f"{r:.3f}×" if r is not None else "–"


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f} %" if x is not None else "–"


def _med(summary: dict | None, scale: float = 1.0, digits: int = 1) -> str:
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
    if q:
        head += ["eval accuracy", "answers = FP32", "tokens = FP32 ONNX", "tokens = PyTorch", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        ratio, speed, quality = TUTORIAL_CLAIMS.get(r.precision, (None, "", ""))
        label = "HF original (PyTorch FP32)" if r.precision == HF_ROW else r.precision.upper()
        claim = f"× {ratio:g}" if ratio else "–"
        if not r.ok:
            cells = [label, claim, f"{speed} / {quality}" if speed else "–",
                     f"**{r.status}**: {_short(r.reason)}"] + [""] * (len(head) - 4)
        else:
            cells = [label, claim, f"{speed} / {quality}" if speed else "–", _mb(r.bytes),
                     _x(report.ratio(r, "fp32")), _x(report.ratio(r, HF_ROW)),
                     f"{r.load_seconds:.2f}" if r.load_seconds is not None else "–", _med(r.ttft, 1000, 0),
                     _med(r.decode_tps), f"{r.peak_rss_mb:,.0f}" if r.peak_rss_mb else "–"]
            if q:
                cells += [_pct(r.eval_accuracy), _pct(r.answer_agreement_fp32), _pct(r.token_agreement_fp32),
                          _pct(r.token_agreement_torch), f"{r.perplexity:.3f}" if r.perplexity else "–"]
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
        quality = (f"acc {_pct(r.eval_accuracy)}, ppl {r.perplexity:.2f}" if report.quality_measured and r.perplexity
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


def precision_pipeline(recipe: Recipe, precision: str, announce: Announce, status=None):
    """A pipeline for ``recipe`` at ``precision`` building in ``build/<recipe>/precisions/<precision>/``."""
    from scripts.pipeline import Paths, Pipeline
    variant = replace(recipe, conversion=replace(recipe.conversion, precision=precision))
    return Pipeline(variant, announce=announce, status=status,
                    root=Paths.for_recipe(recipe).root / "precisions" / precision)


def prepare_model(recipe: Recipe, announce: Announce, status=None):
    """Run the steps that produce the model to convert (demo/synthetic model, adapter merge); return the pipeline."""
    from scripts.pipeline import Pipeline
    main = Pipeline(recipe, announce=announce, status=status)
    for step in main.steps():
        if step.name == "convert":
            break
        if step.name != "doctor":
            main.runner.run(step)
    return main


def build_precision(recipe: Recipe, precision: str, announce: Announce, status=None) -> tuple[Row, Any]:
    """Build (or reuse) one precision up to its smoke-tested package. Failures become a row, not an exception."""
    if (why := refusal(precision)) is not None:
        announce(f"• {precision}: refused before building: {why.split(':')[0]}")
        return Row(precision, "refused", why), None
    pipe = precision_pipeline(recipe, precision, announce, status)
    announce(f"{precision}: build → {pipe.paths.root}")
    try:
        for step in pipe.steps():
            if step.name in ("convert", "package"):
                pipe.runner.run(step)
    except (ConversionError, GraphCheckError, SlmopsError) as exc:
        announce(f"✗ {precision}: {str(exc).splitlines()[0]}")
        return Row(precision, "failed", str(exc), str(pipe.paths.root)), pipe
    from scripts.convert.graph_check import summarise_graph
    from scripts.proof.measure import weights_size
    summary = summarise_graph(pipe.paths.package / "model.onnx")
    return Row(precision, "ok", folder=str(pipe.paths.package), bytes=weights_size(pipe.paths.package),
               graph=summary.describe(), weights_by_type=summary.weight_bytes_by_type()), pipe


def _heldout_ids(recipe: Recipe, model_dir: Path) -> list[int]:
    from scripts.proof.measure import _tokenizer
    if recipe.eval.dataset is None:
        return []
    path = recipe.eval.dataset.with_name(recipe.eval.dataset.stem + "-heldout.txt")
    if not path.is_file():
        return []
    return _tokenizer(model_dir).encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids


def _measure_row(row: Row, backend: str, folder: Path, jobs: list[dict], prompt_dir: Path, context: int,
                 speed: bool) -> dict:
    from scripts.proof.measure import run_worker, to_backend_bench
    result = run_worker(backend, folder, jobs)
    row.load_seconds = result["load_seconds"]
    row.peak_rss_mb = result["peak_rss"] / 1e6
    if speed:
        bench = to_backend_bench(backend, folder, result)
        first = bench.lengths[0]
        row.ttft = first.ttft.to_json() if first.ttft else None
        row.decode_tps = first.decode_tps.to_json() if first.decode_tps else None
    return {j["kind"]: j for j in result["jobs"]}


def run_compare(recipe: Recipe, precisions: Sequence[str] = PRECISIONS, speed: bool = True,
                announce: Announce = log.info, status: Callable[[str], Any] | None = None,
                out_dir: Path | None = None) -> CompareReport:
    """Build every precision, measure each, and write compare.json / compare.md / compare.svg."""
    from scripts.proof.evaluate import conversations, score
    from scripts.proof.measure import bench_request, context_limit, weights_size

    status = status or (lambda s: None)
    synthetic = recipe.source.random_weights
    quality = not synthetic
    note = ("quality not measured: this model has random weights (a size class for size and speed); its accuracy, "
            "agreement and perplexity would be noise" if synthetic else "")
    main = prepare_model(recipe, announce, status)
    hf_dir = main.model_dir
    qa = main.eval_set() if quality else []
    heldout = windows(_heldout_ids(recipe, hf_dir)) if quality else []
    if quality and not qa and not heldout:
        note = "no eval set and no held-out text: quality not measured"
        quality = False
    rows: list[Row] = []
    pipes: dict[str, Any] = {}
    order = [p for p in PRECISIONS if p in precisions]
    for i, p in enumerate(order, 1):
        status(f"building {p} ({i}/{len(order)})…")
        row, pipe = build_precision(recipe, p, announce, status)
        rows.append(row)
        pipes[p] = pipe
    ok = [r for r in rows if r.ok]
    context = min(context_limit(Path(r.folder)) for r in ok) if ok else 512
    chats = conversations(qa, recipe.eval.system_prompt) if qa else []
    answers_job = {"kind": "answers", "conversations": chats, "max_new_tokens": recipe.eval.max_new_tokens}
    logits_job = {"kind": "logits", "windows": heldout}
    logits: dict[str, dict] = {}

    hf_row = Row(HF_ROW, "ok", folder=str(hf_dir), bytes=weights_size(hf_dir), graph="PyTorch, FP32 safetensors")
    jobs: list[dict] = []
    if speed:
        jobs.append(bench_request(hf_dir, COMPARE_PROFILE, context))
    if quality and chats:
        jobs.append(answers_job)
    if quality and heldout:
        jobs.append(logits_job)
    if jobs:
        announce("hf-fp32: measuring the Hugging Face original with PyTorch…")
        status("PyTorch: measuring the original model…")
        try:
            done = _measure_row(hf_row, "torch", hf_dir, jobs, hf_dir, context, speed)
            _quality_from(hf_row, done, qa, score)
            logits["torch"] = done.get("logits")
        except MeasurementError as exc:
            hf_row.status, hf_row.reason = "failed", str(exc)
    for row in ok:
        folder = Path(row.folder)
        jobs = ([bench_request(folder, COMPARE_PROFILE, context)] if speed else []) + \
               ([answers_job] if quality and chats else [])
        announce(f"{row.precision}: measuring through Foundry Local ({len(jobs)} jobs)…")
        status(f"Foundry Local: measuring {row.precision}…")
        try:
            if jobs:
                _quality_from(row, _measure_row(row, "foundry", folder, jobs, folder, context, speed), qa, score)
            if quality and heldout:
                status(f"ONNX Runtime GenAI: scoring held-out text with {row.precision}…")
                logits[row.precision] = run_logits(folder, logits_job)
        except MeasurementError as exc:
            row.status, row.reason = "failed", str(exc)
            announce(f"✗ {row.precision}: {str(exc).splitlines()[0]}")
            continue
        announce(f"✓ {row.precision}: {_mb(row.bytes)} MB, decode {_med(row.decode_tps)} tok/s"
                 + (f", eval accuracy {_pct(row.eval_accuracy)}" if row.eval_accuracy is not None else ""))
    # Agreement with the references
    fp32 = next((r for r in rows if r.precision == "fp32" and r.ok), None)
    for row in [r for r in rows if r.ok] + [hf_row]:
        if fp32 is not None and fp32.answers and row.answers:
            row.answer_agreement_fp32 = answer_agreement(row.answers, fp32.answers)
        mine = logits.get("torch" if row is hf_row else row.precision)
        if mine:
            row.perplexity = perplexity(mine)
            if logits.get("fp32"):
                row.token_agreement_fp32 = token_agreement(mine, logits["fp32"])
            if logits.get("torch"):
                row.token_agreement_torch = token_agreement(mine, logits["torch"])
    report = CompareReport(recipe.name, quality, note, hf_row.bytes or 0, rows + [hf_row],
                           COMPARE_PROFILE.to_json())
    if quality and qa and fp32 is not None and fp32.eval_accuracy is not None:
        refused = {r.precision: r.reason for r in rows if r.status == "refused"}
        failed = {r.precision: None for r in rows if r.status == "failed"}
        winner, reasons = choose_auto({**{r.precision: r.eval_accuracy for r in rows if r.ok}, **failed},
                                      recipe.conversion.auto_threshold, refused)
        report.auto = {"chosen": winner, "threshold": recipe.conversion.auto_threshold, "reasons": reasons}
    write_outputs(report, out_dir or main.paths.root / "proof")  # beside bench/validate: `invoke report` reads it
    return report


def run_logits(folder: Path, job: dict) -> dict:
    from scripts.proof.measure import run_worker
    result = run_worker("genai", folder, [job])
    return next(j for j in result["jobs"] if j["kind"] == "logits")


def _quality_from(row: Row, done: dict, qa, score) -> None:
    if "answers" in done:
        row.answers = [a["text"] for a in done["answers"]["answers"]]
        row.eval_accuracy = score(row.answers, qa).accuracy


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
    if report.auto:
        md += ["", f"`--precision auto` → **{report.auto['chosen']}** (threshold {100 * report.auto['threshold']:.0f} % "
                   "of FP32's eval accuracy):"] + [f"- {line}" for line in report.auto["reasons"]]
    write_text_atomic(files["markdown"], "\n".join(md) + "\n")
    write_text_atomic(files["json"], json.dumps(report.to_json(), indent=2, default=str) + "\n")
    write_text_atomic(files["plot"], svg_plot(report) + "\n")


def auto_precision(recipe: Recipe, announce: Announce = log.info, status=None) -> tuple[Recipe, dict]:
    """``--precision auto``: build the candidates (cached), measure eval accuracy through Foundry Local, and return
    the recipe at the smallest precision within ``conversion.auto_threshold`` of FP32, with the reasoning."""
    if recipe.source.random_weights:
        raise RecipeError(f"{recipe.path}: --precision auto needs meaningful answers, but {recipe.source} has random "
                          "weights. Pick a precision (int4/int8/fp32) for this size class.")
    if recipe.eval.dataset is None:
        raise RecipeError(f"{recipe.path}: --precision auto compares eval accuracy with FP32's; set eval.dataset, or "
                          "choose conversion.precision yourself.")
    report = run_compare(recipe, precisions=[p for p in BY_SIZE if p in PRECISIONS], speed=False, announce=announce,
                         status=status)
    if not report.auto:
        raise QualityCompareError(f"--precision auto could not measure FP32's eval accuracy: "
                                  f"{report.row('fp32').reason if report.row('fp32') else 'no fp32 row'}")
    chosen = report.auto["chosen"]
    for line in report.auto["reasons"]:
        announce(f"       {line}")
    return replace(recipe, conversion=replace(recipe.conversion, precision=chosen)), report.auto


class QualityCompareError(SlmopsError):
    """The comparison could not produce the reference figures ``--precision auto`` needs."""


def apply_precision(recipe: Recipe, precision: str | None, announce: Announce = log.info, status=None) -> Recipe:
    """``--precision P`` over the recipe's ``conversion.precision``; ``auto`` (flag or recipe) is resolved here by
    measuring the candidates. Refused precisions (fp16 on CPU) raise :class:`RecipeError` before anything is built."""
    wanted = precision or recipe.conversion.precision
    if wanted not in (*PRECISIONS, "auto"):
        raise RecipeError(f"--precision {wanted!r} is not a precision; choose one of: {', '.join(PRECISIONS)}, auto.")
    if (why := refusal(wanted)) is not None:
        raise RecipeError(f"--precision {wanted}: refused. {why}")
    if wanted == "auto":
        announce("--precision auto: building and evaluating the candidates (cached builds are reused)…")
        chosen, auto = auto_precision(recipe, announce, status)
        announce(f"--precision auto chose {chosen.conversion.precision}: the smallest precision whose eval accuracy is "
                 f"within {100 * auto['threshold']:.0f} % of FP32's")
        return chosen
    return replace(recipe, conversion=replace(recipe.conversion, precision=wanted))
