"""`invoke compare`: every precision of the tutorial's table, built from one recipe and measured side by side.

Each precision is built by the normal steps (convert → package, which includes the GenAI smoke test) in its own
folder ``build/<recipe>/precisions/<p>/`` with its own stamps, so re-running reuses the builds. Then, per build,
one worker process per backend (:mod:`scripts.proof.measure`):

- Foundry Local (as deployed): load time, time to first token, decode tokens/s, peak RSS, and the eval-set answers
  (and the tool set's held-out cases, ``eval.tools``, as ``invoke serve`` writes them);
- ONNX Runtime GenAI on the same folder: teacher-forced logits over held-out text (perplexity, greedy-token
  agreement with the FP32 ONNX build and with the original PyTorch model);
- PyTorch on the Hugging Face original: the same figures, as the reference row.

Speed figures are medians of repeated runs on a shared machine: compare ratios, not absolutes. Models made from a
config with random weights (``synthetic:`` sources) get sizes and speeds only: their quality figures would be noise.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.convert.graph_check import summarise_graph
from scripts.core.errors import ConversionError, GraphCheckError, MeasurementError, SlmopsError
from scripts.commands.variants import build_package, precision_pipeline, prepare_model
from scripts.pipeline import prepared_recipe
from scripts.core.evalset import conversations, score
from scripts.core.tool_evalset import score_outcomes
from scripts.families.tools import reply_calls
from scripts.proof.measure import (bench_request, context_limit, Profile, run_worker, to_backend_bench,
                                   weights_size)
from scripts.commands.compare_report import (HF_ROW, CompareReport, Row, answer_agreement, fmt_mb, fmt_median, fmt_pct,
                                          perplexity, token_agreement, write_outputs)
from scripts.proof.fidelity import failures as fidelity_failures
from scripts.proof.gate import heldout_windows
from scripts.proof.peer_bench import PeerRun
from scripts.recipe.spec import Recipe
from scripts.recipe.precisions import smallest_precision, refusal, TABLE_ORDER

log = logging.getLogger(__name__)
Announce = Callable[[str], None]

#: One prompt length, short runs: enough to rank precisions; `invoke bench` has the full profile.
COMPARE_PROFILE = Profile("compare", lengths=(128,), max_prompt_tokens=128, new_tokens=32, warmup=1, repeats=3)


def build_precision(recipe: Recipe, precision: str, announce: Announce, status=None) -> tuple[Row, Any]:
    """Build (or reuse) one precision up to its smoke-tested package. Failures become a row, not an exception."""
    if (why := refusal(precision)) is not None:
        announce(f"• {precision}: refused before building: {why.split(':')[0]}")
        return Row(precision, "refused", why), None
    pipe = precision_pipeline(recipe, precision, announce, status)
    announce(f"{precision}: build → {pipe.paths.root}")
    try:
        build_package(pipe)
    except (ConversionError, GraphCheckError, SlmopsError) as exc:
        announce(f"✗ {precision}: {str(exc).splitlines()[0]}")
        return Row(precision, "failed", str(exc), str(pipe.paths.root)), pipe
    summary = summarise_graph(pipe.paths.package / "model.onnx")
    return Row(precision, "ok", folder=str(pipe.paths.package), bytes=weights_size(pipe.paths.package),
               graph=summary.describe(), weights_by_type=summary.weight_bytes_by_type()), pipe


def fp32_bench_run(pipeline, status=None) -> PeerRun:
    """The same model's FP32 ONNX build (built, or reused, in ``build/<recipe>/precisions/fp32/``) as a raw GenAI run
    for ``invoke bench --fp32``: "INT4 TTFT below FP32 ONNX's at every length"."""
    recipe = prepared_recipe(pipeline.recipe, prepare_model(pipeline.recipe, log.info, status))
    if status:
        status("bench: building (or reusing) the FP32 ONNX build…")
    row, _ = build_precision(recipe, "fp32", log.info, status)
    if row.status != "ok":
        raise MeasurementError(f"The FP32 ONNX build the bench compares with could not be built: {row.reason}")
    return PeerRun("genai:fp32", "genai", "ONNX Runtime GenAI FP32 (raw, same model)", Path(row.folder), {})


def _measure_row(row: Row, backend: str, folder: Path, jobs: list[dict], speed: bool,
                 options: dict | None = None) -> dict:
    result = run_worker(backend, folder, jobs, options)
    row.load_seconds = result["load_seconds"]
    row.peak_rss_mb = result["peak_rss"] / 1e6
    if speed:
        bench = to_backend_bench(backend, folder, result)
        first = bench.lengths[0]
        row.ttft = first.ttft.to_json() if first.ttft else None
        row.decode_tps = first.decode_tps.to_json() if first.decode_tps else None
    return {j["kind"]: j for j in result["jobs"]}


def run_compare(recipe: Recipe, precisions: Sequence[str] = TABLE_ORDER, speed: bool = True,
                announce: Announce = log.info, status: Callable[[str], Any] | None = None,
                out_dir: Path | None = None) -> CompareReport:
    """Build every precision, measure each, and write compare.json / compare.md / compare.svg."""

    status = status or (lambda s: None)
    synthetic = recipe.source.random_weights
    quality = not synthetic
    note = ("quality not measured: this model has random weights (a size class for size and speed); its accuracy, "
            "agreement and perplexity would be noise" if synthetic else "")
    main = prepare_model(recipe, announce, status)
    hf_dir = main.model_dir
    builds = prepared_recipe(recipe, main)
    qa = main.eval_set() if quality else []
    cases = main.tool_cases() if quality else []
    rows: list[Row] = []
    pipes: dict[str, Any] = {}
    order = [p for p in TABLE_ORDER if p in precisions]
    for i, p in enumerate(order, 1):
        status(f"building {p} ({i}/{len(order)})…")
        row, pipe = build_precision(builds, p, announce, status)
        rows.append(row)
        pipes[p] = pipe
    ok = [r for r in rows if r.ok]
    context = min(context_limit(Path(r.folder)) for r in ok) if ok else 512
    heldout = heldout_windows(hf_dir, context, recipe.conversion.fidelity.heldout_tokens) if quality else []
    # prompts in the chat template the package step chose (the tokenizer's, or the family's for a base model that has
    # none): the one every build is measured with, and the one Foundry Local applies
    chat_dir = Path(ok[0].folder) if ok else hf_dir
    tool_chats, fmt = main.tool_chats(cases, chat_dir)
    chats = (conversations(qa, recipe.eval.system_prompt) if qa else []) + tool_chats
    answers_job = {"kind": "answers", "conversations": chats, "max_new_tokens": recipe.eval.max_new_tokens}
    quality_from = partial(_quality_from, qa=qa, cases=cases, fmt=fmt)
    logits_job = {"kind": "logits", "windows": heldout}
    logits: dict[str, dict] = {}

    hf_row = Row(HF_ROW, "ok", folder=str(hf_dir), bytes=weights_size(hf_dir), graph="PyTorch, FP32 safetensors")
    jobs: list[dict] = []
    if speed:
        jobs.append(bench_request(chat_dir, COMPARE_PROFILE, context))
    if quality and chats:
        jobs.append(answers_job)
    if quality and heldout:
        jobs.append(logits_job)
    if jobs:
        announce("hf-fp32: measuring the Hugging Face original with PyTorch…")
        status("PyTorch: measuring the original model…")
        try:
            done = _measure_row(hf_row, "torch", hf_dir, jobs, speed, {"chat_dir": str(chat_dir)})
            quality_from(hf_row, done)
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
                quality_from(row, _measure_row(row, "foundry", folder, jobs, speed))
            if quality and heldout:
                status(f"ONNX Runtime GenAI: scoring held-out text with {row.precision}…")
                reference = next((r.folder for r in ok if r.precision == "fp32"), None)
                fidelity = ({"kind": "fidelity", "windows": heldout, "reference_dir": reference}
                            if reference and row.precision != "fp32" else None)
                done = run_genai(folder, [logits_job] + ([fidelity] if fidelity else []))
                logits[row.precision] = done["logits"]
                if "fidelity" in done:
                    _fidelity_from(row, done["fidelity"])
        except MeasurementError as exc:
            row.status, row.reason = "failed", str(exc)
            announce(f"✗ {row.precision}: {str(exc).splitlines()[0]}")
            continue
        announce(f"✓ {row.precision}: {fmt_mb(row.bytes)} MB, decode {fmt_median(row.decode_tps)} tok/s"
                 + (f", eval accuracy {fmt_pct(row.eval_accuracy)}" if row.eval_accuracy is not None else ""))
    # Agreement with the references
    fp32 = next((r for r in rows if r.precision == "fp32" and r.ok), None)
    for row in [r for r in rows if r.ok] + [hf_row]:
        if fp32 is not None and fp32.answers and row.answers:
            row.answer_agreement_fp32 = answer_agreement(row.answers, fp32.answers)
        mine = logits.get("torch" if row is hf_row else row.precision)
        if mine:
            row.perplexity = perplexity(mine)
            if logits.get("fp32") and row.token_agreement_fp32 is None:
                row.token_agreement_fp32 = token_agreement(mine, logits["fp32"])
            if logits.get("torch"):
                row.token_agreement_torch = token_agreement(mine, logits["torch"])
    report = CompareReport(recipe.name, quality, note, hf_row.bytes or 0, rows + [hf_row],
                           COMPARE_PROFILE.to_json())
    if quality and qa and fp32 is not None and fp32.eval_accuracy is not None:
        refused = {r.precision: r.reason for r in rows if r.status == "refused"}
        failed = {r.precision: None for r in rows if r.status == "failed"}
        spec = recipe.conversion.fidelity
        misses = {r.precision: fidelity_failures({"kld_mean": r.kld_mean, "top1": r.token_agreement_fp32,
                                                  "ppl_increase": r.ppl_increase}, spec)
                  for r in rows if r.ok and r.kld_mean is not None}
        winner, reasons = smallest_precision({**{r.precision: r.eval_accuracy for r in rows if r.ok}, **failed},
                                      recipe.conversion.auto_threshold, refused, misses)
        report.smallest = {"chosen": winner, "threshold": recipe.conversion.auto_threshold, "reasons": reasons}
    write_outputs(report, out_dir or main.paths.root / "proof")  # beside bench/validate: `invoke report` reads it
    return report


def run_genai(folder: Path, jobs: list[dict]) -> dict[str, dict]:
    """Jobs on one ONNX Runtime GenAI worker, by kind."""
    return {j["kind"]: j for j in run_worker("genai", folder, jobs)["jobs"]}


def _fidelity_from(row: Row, figures: dict) -> None:
    row.kld_mean, row.kld_p99, row.ppl_increase = figures["kld_mean"], figures["kld_p99"], figures["ppl_increase"]
    row.token_agreement_fp32 = figures["top1"]


def _quality_from(row: Row, done: dict, qa, cases, fmt) -> None:
    """Eval accuracy (the first ``len(qa)`` answers) and the tool score (the rest, replies to ``cases``)."""
    if "answers" in done:
        row.answers = [a["text"] for a in done["answers"]["answers"]]
        if qa:
            row.eval_accuracy = score(row.answers[:len(qa)], qa).accuracy
        if cases:
            tools = score_outcomes(cases, [reply_calls(t, fmt) for t in row.answers[len(qa):]])
            row.tool_calls, row.tool_no_call = tools.call_accuracy, tools.no_call_accuracy
            row.tool_results_read = tools.read_accuracy if tools.reads else None
