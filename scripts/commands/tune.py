"""`invoke tune` (and `--precision auto`, :mod:`scripts.commands.auto`): build and measure layouts, and choose one
that keeps the recipe's quality thresholds — tune the fastest, auto the smallest
(:class:`scripts.commands.layouts.Policy`).

Each candidate (:data:`scripts.commands.layouts.GRID`, or a JSON file of your own) is a layout: ``conversion``
keys over the schema defaults (:func:`scripts.commands.layouts.candidate_conversion`). Per candidate, cached like every
step:

- build: the normal convert → package steps in ``build/<recipe>/tune/<candidate>/`` (graph-checked, smoke-tested);
- measure (a ``tune-measure`` step, :mod:`scripts.commands.tune_measure`; re-measured only when the package, the FP32
  reference, the eval set, the thresholds or that module change): through Foundry Local the eval answers and speed
  (time to first token and decode at a 128-token prompt, ``TUNE_PROFILE``); through ONNX Runtime GenAI the fidelity
  to the FP32 ONNX build on held-out text (mean/p99 KL divergence, top-1 agreement, ΔPPL); the weights' size.

A candidate qualifies when its eval accuracy is ≥ ``conversion.auto_threshold`` × FP32's, it meets
``conversion.fidelity`` and its size is ≤ ``max_size_ratio`` × the FP32 ONNX build's (tune only). When several are in
the final choice (tune: all that qualify; auto: those near the smallest), their speed is measured again side by side (a
*run-off*: ``RUNOFF_ROUNDS`` interleaved rounds, runs pooled; a ``tune-runoff`` step) — their first figures were
taken minutes apart on a shared machine. Fastest means the shortest *answer time* (TTFT + 64 decoded tokens). The
table goes to ``proof/tune.{json,md}`` (``proof/auto.…``); tune prints the winner's recipe keys to paste into the
recipe (nothing is changed behind your back), auto deploys its choice. When the
model source is a quantized GGUF, a note under the table says what quantizing it a second time costs
(:func:`scripts.sources.gguf.requantization_note`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.errors import ConversionError, GraphCheckError, MeasurementError, RecipeError, SlmopsError
from scripts.core.fileops import write_text_atomic
from scripts.commands.variants import build_package, prepare_model, variant_pipeline
from scripts.pipeline import Pipeline, prepared_recipe
from scripts.commands.compare import build_precision
from scripts.proof.gate import heldout_windows
from scripts.core.evalset import conversations, score
from scripts.proof.fidelity import failures as fidelity_failures
from scripts.proof.measure import context_limit
from scripts.commands.tune_measure import measure_candidate, runoff, RUNOFF_ROUNDS, TUNE_PROFILE
from scripts.commands.layouts import candidate_conversion, describe, FASTEST, GRID, layout_keys, Policy
from scripts.recipe.spec import Conversion, Recipe
from scripts.sources.gguf import requantization_note
from scripts.core.steps import Step

log = logging.getLogger(__name__)
Announce = Callable[[str], None]

ANSWER_TOKENS = 64  # the answer time: TTFT + this many decoded tokens


@dataclass
class TuneRow:
    """One candidate and what it measured (None: not measured)."""

    name: str
    quantization: dict[str, Any]
    status: str = "ok"  # ok | failed
    reason: str = ""
    bytes: int | None = None
    size_ratio: float | None = None
    eval_accuracy: float | None = None
    ttft_ms: float | None = None
    decode_tps: float | None = None
    fidelity: dict[str, Any] | None = None
    misses: list[str] = field(default_factory=list)
    qualifies: bool = False
    runoff: bool = False  # speed re-measured in the run-off (:func:`scripts.commands.tune_measure.runoff`)

    @property
    def answer_ms(self) -> float | None:
        if self.ttft_ms is None or not self.decode_tps:
            return None
        return self.ttft_ms + 1000 * ANSWER_TOKENS / self.decode_tps


def load_candidates(path: Path | None) -> list[dict[str, Any]]:
    """The built-in :data:`GRID`, or a JSON list of ``{"name": …, <layout keys>}`` objects (each checked)."""
    if path is None:
        return [dict(c) for c in GRID]
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"--candidates {path}: cannot be read as JSON ({exc}).") from None
    if not isinstance(doc, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in doc):
        raise RecipeError(f"--candidates {path}: expected a JSON list of objects, each with a \"name\" and "
                          "conversion.quantization keys, e.g. [{\"name\": \"b64\", \"block_size\": 64}].")
    names = [c["name"] for c in doc]
    if len(set(names)) != len(names):
        raise RecipeError(f"--candidates {path}: candidate names must be unique.")
    for cand in doc:
        candidate_conversion(Conversion(precision="int4"), cand)
    return doc


def judge(rows: Sequence[TuneRow], fp32_accuracy: float | None, threshold: float, spec,
          max_size_ratio: float | None, policy: Policy = FASTEST) -> TuneRow | None:
    """Fill ``misses``/``qualifies`` of every measured row; return the qualifying one ``policy`` chooses (pure)."""
    for row in rows:
        if row.status != "ok":
            continue
        misses = list(fidelity_failures(row.fidelity, spec)) if row.fidelity else ["fidelity not measured"]
        if fp32_accuracy is not None and row.eval_accuracy is not None and \
                row.eval_accuracy < threshold * fp32_accuracy - 1e-12:
            misses.append(f"eval accuracy {100 * row.eval_accuracy:.1f} % < {100 * threshold:.0f} % of FP32's "
                          f"{100 * fp32_accuracy:.1f} %")
        if max_size_ratio is not None and row.size_ratio is not None and row.size_ratio > max_size_ratio:
            misses.append(f"size {row.size_ratio:.3f}× FP32 > {max_size_ratio}×")
        row.misses, row.qualifies = misses, not misses
    return policy.choose(rows)


def run_tune(recipe: Recipe, candidates: list[dict[str, Any]], max_size_ratio: float | None = 0.25,
             announce: Announce = log.info, status: Callable[[str], Any] | None = None,
             policy: Policy = FASTEST) -> dict[str, Any]:
    """Build and measure the FP32 reference and every candidate; judge; write ``proof/<policy>.{json,md}``."""
    status = status or (lambda s: None)
    if recipe.source.random_weights:
        raise RecipeError(f"{recipe.path}: tune judges quality, but {recipe.source} has random weights; tune a model "
                          "with real weights.")
    main = prepare_model(recipe, announce, status)
    builds = prepared_recipe(recipe, main)
    source_note = requantization_note(source_weight_types(main), bool(recipe.adapter or recipe.finetune.dataset))
    if source_note:
        announce(source_note)
    qa = main.eval_set()
    chats = conversations(qa, recipe.eval.system_prompt) if qa else []
    status("building the FP32 reference…")
    fp32_row, fp32_pipe = build_precision(builds, "fp32", announce, status)
    if not fp32_row.ok:
        raise ConversionError(f"tune needs the FP32 ONNX build as its reference: {fp32_row.reason}")
    fp32_folder = Path(fp32_row.folder)
    context = context_limit(fp32_folder)
    heldout = heldout_windows(main.model_dir, context, recipe.conversion.fidelity.heldout_tokens)
    spec = recipe.conversion.fidelity
    settings = {"profile": TUNE_PROFILE.to_json(), "max_new_tokens": recipe.eval.max_new_tokens,
                "heldout_tokens": spec.heldout_tokens, "system_prompt": recipe.eval.system_prompt}
    inputs = [fp32_folder] + ([recipe.eval.dataset] if recipe.eval.dataset else [])

    def measured(pipe: Pipeline, folder: Path, label: str) -> dict[str, Any]:
        status(f"measuring {label} through Foundry Local and ONNX Runtime GenAI…")
        step = Step("tune-measure", lambda: measure_candidate(folder, fp32_folder, chats, heldout,
                                                              recipe.eval.max_new_tokens, context),
                    inputs=[folder, *inputs], settings=settings, code=["scripts.commands.tune_measure"])
        return pipe.runner.run(step).result

    reference = measured(fp32_pipe, fp32_folder, "fp32")
    fp32_accuracy = score(reference["answers"], qa).accuracy if qa and reference["answers"] else None
    rows: list[TuneRow] = []
    folders: dict[str, Path] = {}
    for i, cand in enumerate(candidates, 1):
        name = cand["name"]
        row = TuneRow(name, {k: v for k, v in cand.items() if k != "name"})
        rows.append(row)
        conversion = candidate_conversion(recipe.conversion, cand)
        pipe = variant_pipeline(builds, conversion, f"tune/{name}", announce, status)
        folders[name] = pipe.paths.package
        announce(f"{name} ({i}/{len(candidates)}): build → {pipe.paths.root}")
        try:
            build_package(pipe)
            figures = measured(pipe, pipe.paths.package, name)
        except (ConversionError, GraphCheckError, MeasurementError, SlmopsError) as exc:
            row.status, row.reason = "failed", str(exc).splitlines()[0]
            announce(f"✗ {name}: {row.reason}")
            continue
        row.bytes = figures["bytes"]
        row.size_ratio = figures["bytes"] / reference["bytes"]
        row.ttft_ms, row.decode_tps, row.fidelity = figures["ttft_ms"], figures["decode_tps"], figures.get("fidelity")
        row.eval_accuracy = score(figures["answers"], qa).accuracy if qa and figures["answers"] else None
    winner = judge(rows, fp32_accuracy, recipe.conversion.auto_threshold, spec, max_size_ratio, policy)
    finalists = [r.name for r in policy.finalists(rows)]
    if len(finalists) > 1:  # their first figures were taken minutes apart: measure them again side by side
        status(f"run-off: {len(finalists)} qualifying candidates, {RUNOFF_ROUNDS} interleaved rounds…")
        step = Step("tune-runoff", lambda: runoff([(n, folders[n]) for n in finalists], context),
                    inputs=[folders[n] for n in finalists],
                    settings={"profile": TUNE_PROFILE.to_json(), "rounds": RUNOFF_ROUNDS, "finalists": finalists},
                    code=["scripts.commands.tune_measure"])
        try:
            apply_runoff(rows, main.runner.run(step).result)
            winner = judge(rows, fp32_accuracy, recipe.conversion.auto_threshold, spec, max_size_ratio, policy)
        except MeasurementError as exc:  # keep every candidate's first figures rather than lose the search
            announce(f"✗ run-off: {str(exc).splitlines()[0]} — choosing on the first measurements")
    report = {"recipe": recipe.name, "search": policy.name, "rule": policy.rule, "max_size_ratio": max_size_ratio,
              "threshold": recipe.conversion.auto_threshold,
              "fidelity_spec": asdict(spec), "profile": TUNE_PROFILE.to_json(), "answer_tokens": ANSWER_TOKENS,
              "fp32": {"bytes": reference["bytes"], "eval_accuracy": fp32_accuracy, "ttft_ms": reference["ttft_ms"],
                       "decode_tps": reference["decode_tps"]},
              "rows": [{**asdict(r), "answer_ms": r.answer_ms} for r in rows],
              "winner": winner.name if winner else None, "source_note": source_note,
              "runoff_rounds": RUNOFF_ROUNDS if any(r.runoff for r in rows) else None,
              "recipe_keys": winner_keys(winner) if winner else None}
    out = main.paths.root / "proof"
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{policy.name}.json", "md": out / f"{policy.name}.md"}
    write_text_atomic(files["json"], json.dumps(report, indent=2) + "\n")
    write_text_atomic(files["md"], markdown(report) + "\n")
    report["files"] = {k: str(v) for k, v in files.items()}
    return report


def apply_runoff(rows: Sequence[TuneRow], figures: dict[str, dict]) -> None:
    """Replace the speed of the rows the run-off measured with its pooled figures (pure)."""
    for row in rows:
        if row.name in figures:
            row.ttft_ms, row.decode_tps = figures[row.name]["ttft_ms"], figures[row.name]["decode_tps"]
            row.runoff = True


def source_weight_types(main: Pipeline) -> dict[str, int] | None:
    """Parameters per GGUF storage type of the model source, as its import step recorded them (None: not a GGUF)."""
    name = main.recipe.source.info.step
    step = main.step(name) if name else None
    return (main.runner.recorded_result(step) or {}).get("weight_types") if step else None


def winner_keys(winner: TuneRow) -> dict[str, Any]:
    """The ``conversion`` block to paste into the recipe for the winner."""
    return {"conversion": layout_keys({"name": winner.name, **winner.quantization})}


def _f(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def markdown(report: dict[str, Any]) -> str:
    """The search as a table: one row per candidate, FP32 first."""
    fp32 = report["fp32"]
    lines = ["| candidate | layout | size MB (× FP32) | eval acc | mean KLD | p99 KLD | top-1 | ΔPPL | "
             "TTFT ms | decode tok/s | answer ms | verdict |", "|" + "---|" * 12,
             f"| fp32 (reference) | – | {_f(fp32['bytes'], '.1f', 1e-6)} (1.00) | "
             f"{_f(fp32['eval_accuracy'], '.1f', 100)} % | 0 | 0 | 100 % | 0 | {_f(fp32['ttft_ms'], '.0f')} | "
             f"{_f(fp32['decode_tps'], '.0f')} | – | reference |"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | | | | | | | | | | | failed: {r['reason'][:80]} |")
            continue
        fid = r["fidelity"] or {}
        verdict = ("**winner**" if r["name"] == report["winner"] else "qualifies") if r["qualifies"] \
            else "; ".join(r["misses"])
        lines.append(
            f"| {r['name']} | {describe(r['quantization'])} | "
            f"{_f(r['bytes'], '.1f', 1e-6)} ({_f(r['size_ratio'], '.3f')}) | {_f(r['eval_accuracy'], '.1f', 100)} % | "
            f"{_f(fid.get('kld_mean'), '.4f')} | {_f(fid.get('kld_p99'), '.3f')} | "
            f"{_f(fid.get('top1'), '.1f', 100)} % | {_f(fid.get('ppl_increase'), '+.1f', 100)} % | "
            f"{_f(r['ttft_ms'], '.0f')} | {_f(r['decode_tps'], '.0f')} | {_f(r['answer_ms'], '.0f')} | {verdict} |")
    spec = report["fidelity_spec"]
    lines.append(f"\nQualifies: eval accuracy ≥ {100 * report['threshold']:.0f} % of FP32's (through Foundry Local), "
                 f"mean KLD ≤ {spec['max_kld']}, top-1 ≥ {100 * spec['min_top1']:.0f} %, ΔPPL ≤ "
                 f"{100 * spec['max_ppl_increase']:.0f} % (ONNX Runtime GenAI vs the FP32 ONNX build, "
                 f"{spec['heldout_tokens']} held-out tokens)"
                 + (f", size ≤ {report['max_size_ratio']}× FP32" if report.get("max_size_ratio") else "")
                 + f". {report.get('rule', FASTEST.rule)}; fastest = shortest answer time (TTFT at a 128-token prompt "
                 f"+ {report['answer_tokens']} tokens at the decode rate), medians of 3 runs on a shared machine.")
    if report.get("runoff_rounds"):
        ran = [r["name"] for r in report["rows"] if r.get("runoff")]
        lines.append(f"\nRun-off: the speed of the qualifying candidates ({', '.join(ran)}) was measured again, "
                     f"interleaved over {report['runoff_rounds']} rounds (each once per round), every run pooled; "
                     "their TTFT, decode and answer time above are those medians.")
    if report.get("source_note"):
        lines.append(f"\n{report['source_note']}")
    return "\n".join(lines)
