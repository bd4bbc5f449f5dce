"""`invoke validate`: the tutorial's deployment checklist, measured through the Foundry Local runtime.

| item | figure | passes when |
|---|---|---|
| domain | eval accuracy through Foundry Local; agreement with the FP32 PyTorch model's answers | ≥ ``eval.min_accuracy`` and ≥ ``validate.min_reference_agreement`` |
| format | share of eval answers with the expected structure (non-empty, no control tokens, ``validate.format_regex`` / ``format_json_keys``) | ≥ ``validate.min_format_rate`` |
| leaks | RSS growth and slope (the smaller of the two halves' slopes: a leak grows in both, one allocator step in one) over a soak of ``validate.soak_requests`` requests on one loaded model | ≤ ``max_rss_growth_mb`` and ≤ ``max_rss_slope_kb_per_request`` |
| lengths | median per-token latency from the shortest to the near-context prompt | ratio ≤ ``max_latency_ratio`` |
| tool calls | with ``eval.tools``: held-out calls with exact names and arguments, and no-call cases answered in text, through Foundry Local (the tools written as ``invoke serve`` writes them); beside them the FP32 PyTorch model's | each ≥ ``eval.min_accuracy`` |
| edge cases | empty/whitespace/over-context/non-UTF-8/emoji/control tokens/max tokens 0 and negative/concurrent | each gives a defined answer or a clear error and the runtime keeps serving |

The pure functions (``*_item``) turn figures into verdicts and are unit-tested; :func:`run_validate` does the
I/O (worker processes: Foundry Local for everything the user sees, PyTorch for the FP32 reference).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.hf_folder import control_tokens
from scripts.proof.edge_cases import edge_cases, edge_verdicts
from scripts.core.evalset import conversations
from scripts.proof.measure import bench_request, context_limit, run_worker, summarise_length
from scripts.core.evalset import answers_match
from scripts.proof.stats import percentile, slope

log = logging.getLogger(__name__)

PASS, FAIL, SKIP = "pass", "fail", "skip"
DEFAULT_PROMPTS = ("Hello, who are you?", "What can you help me with?")


@dataclass(frozen=True)
class Item:
    key: str
    title: str
    status: str  # pass | fail | skip
    figure: str
    detail: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_json(self) -> dict:
        return asdict(self)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# --------------------------------------------------------------------------------------------------
# Verdicts (pure)
# --------------------------------------------------------------------------------------------------


def domain_item(answers: Sequence[str], references: Sequence[str], reference_answers: Sequence[str] | None,
                min_accuracy: float, min_agreement: float) -> Item:
    """Accuracy against the eval set's answers, and agreement with the FP32 model's own answers."""
    title = "domain answers"
    if not references:
        return Item("domain", title, SKIP, "no eval.dataset in the recipe: nothing to score")
    correct = sum(answers_match(a, r) for a, r in zip(answers, references, strict=True))
    acc = correct / len(references)
    figure = f"accuracy {_pct(acc)} ({correct}/{len(references)}, need {_pct(min_accuracy)})"
    ok = acc >= min_accuracy
    detail: dict[str, Any] = {"accuracy": acc, "correct": correct, "total": len(references),
                              "wrong": [{"got": a, "expected": r} for a, r in zip(answers, references)
                                        if not answers_match(a, r)][:10]}
    if reference_answers is not None:
        same = sum(answers_match(a, r) for a, r in zip(answers, reference_answers, strict=True))
        agreement = same / len(reference_answers)
        ref_acc = sum(answers_match(a, r) for a, r in zip(reference_answers, references)) / len(references)
        figure += (f"; FP32 PyTorch {_pct(ref_acc)}, same answer as FP32 {_pct(agreement)} "
                   f"(need {_pct(min_agreement)})")
        detail.update(reference_accuracy=ref_acc, agreement=agreement)
        ok = ok and agreement >= min_agreement
    else:
        figure += "; FP32 reference not available"
    return Item("domain", title, PASS if ok else FAIL, figure, detail)


def tool_item(score, reference, min_accuracy: float) -> Item:
    """Held-out tool cases (:class:`scripts.core.tool_evalset.ToolScore` through Foundry Local; ``reference``: the
    FP32 PyTorch model's, or None)."""
    title = "tool calls"
    if score is None:
        return Item("tools", title, SKIP, "no eval.tools in the recipe: nothing to score")
    figure = f"{score.figure()} (need {_pct(min_accuracy)} of each)"
    detail: dict[str, Any] = score.to_json()
    if reference is not None:
        figure += f"; FP32 PyTorch {reference.figure()}"
        detail["reference"] = reference.to_json()
    return Item("tools", title, PASS if score.passes(min_accuracy) else FAIL, figure, detail)


def format_problem(answer: str, regex: str | None, json_keys: Sequence[str] | None,
                   controls: Sequence[str]) -> str | None:
    """Why ``answer`` does not have the expected structure, or None."""
    if not answer.strip():
        return "empty answer"
    leaked = [t for t in controls if t in answer]
    if leaked:
        return f"contains control token(s) {', '.join(leaked)}"
    if regex and not re.fullmatch(regex, answer.strip(), flags=re.DOTALL):
        return f"does not match {regex!r}"
    if json_keys is not None:
        try:
            doc = json.loads(answer)
        except json.JSONDecodeError as exc:
            return f"not JSON ({exc.msg})"
        if not isinstance(doc, dict):
            return "not a JSON object"
        missing = [k for k in json_keys if k not in doc]
        if missing:
            return f"JSON lacks {', '.join(missing)}"
    return None


def format_item(answers: Sequence[str], regex: str | None, json_keys: Sequence[str] | None,
                controls: Sequence[str], min_rate: float) -> Item:
    if not answers:
        return Item("format", "answer format", SKIP, "no answers to check")
    problems = [(a, p) for a in answers if (p := format_problem(a, regex, json_keys, controls))]
    rate = 1 - len(problems) / len(answers)
    rules = ["non-empty", "no control tokens"] + ([f"matches {regex!r}"] if regex else []) + \
            ([f"JSON with {', '.join(json_keys)}"] if json_keys is not None else [])
    figure = f"{_pct(rate)} well-formed ({len(answers) - len(problems)}/{len(answers)}; {', '.join(rules)})"
    return Item("format", "answer format", PASS if rate >= min_rate else FAIL, figure,
                {"rate": rate, "rules": rules, "bad": [{"answer": a, "problem": p} for a, p in problems[:10]]})


def leak_figures(rss: Sequence[int]) -> dict:
    """RSS over a soak, ignoring the first 10 % (warm-up: caches and allocator pools fill).

    growth = median of the last tenth − median of the first tenth after warm-up. The slope is the *smaller* of the
    least-squares slopes of the two halves: a leak grows in both halves, while one allocator step (an arena that
    grows once, then stays flat) lands in one half only and is bounded by the growth limit instead — scored over the
    whole soak, a single +12 MB step once failed a 300-request soak at 58 KB/request."""
    if len(rss) < 10:
        raise ValueError("a soak needs at least 10 requests")
    warm = max(1, len(rss) // 10)
    body = list(rss[warm:])
    tenth = max(1, len(body) // 10)
    growth = percentile(body[-tenth:], 50) - percentile(body[:tenth], 50)
    def kb_per_request(part):
        return slope(list(range(len(part))), part) / 1e3

    half = len(body) // 2
    halves = [kb_per_request(body[:half]), kb_per_request(body[half:])]
    return {"requests": len(rss), "warmup": warm, "start_mb": body[0] / 1e6, "end_mb": body[-1] / 1e6,
            "growth_mb": growth / 1e6, "slope_kb_per_request": min(halves), "half_slopes_kb_per_request": halves,
            "whole_slope_kb_per_request": kb_per_request(body)}


def leak_item(rss: Sequence[int], n_errors: int, max_growth_mb: float, max_slope_kb: float) -> Item:
    f = leak_figures(rss)
    ok = f["growth_mb"] <= max_growth_mb and f["slope_kb_per_request"] <= max_slope_kb and n_errors == 0
    figure = (f"{f['requests']} requests: RSS {f['start_mb']:.0f} → {f['end_mb']:.0f} MB, growth "
              f"{f['growth_mb']:+.1f} MB (max {max_growth_mb:g}), slope {f['slope_kb_per_request']:+.2f} KB/request "
              f"(max {max_slope_kb:g})" + (f", {n_errors} failed requests" if n_errors else ""))
    return Item("leaks", "no memory leaks in long use", PASS if ok else FAIL, figure, {**f, "errors": n_errors})


def lengths_item(lengths: Sequence[dict], max_ratio: float, floor_ms: float = 1.0) -> Item:
    """``lengths``: ``{"prompt_tokens", "ms_per_token"}`` per prompt length (from a Foundry bench job).
    Passes when the worst is within ``max_ratio`` of the shortest prompt's, or below ``floor_ms`` (below a
    millisecond per token the ratio measures scheduling noise, not the model)."""
    title = "consistent performance across input lengths"
    missing = [x["prompt_tokens"] for x in lengths if not x.get("ms_per_token")]
    if not lengths or missing:
        return Item("lengths", title, FAIL, f"no per-token latency at prompt length(s) {missing or '(none)'}")
    first = lengths[0]["ms_per_token"]
    worst = max(x["ms_per_token"] for x in lengths)
    ratio = worst / first
    steps = " → ".join(f"{x['ms_per_token']:.3g} ms ({x['prompt_tokens']} tok)" for x in lengths)
    floor = f", or all under {floor_ms:g} ms" if worst <= floor_ms else ""
    return Item("lengths", title, PASS if ratio <= max_ratio or worst <= floor_ms else FAIL,
                f"per-token latency {steps}; worst ×{ratio:.2f} of the shortest (max ×{max_ratio:g}{floor})",
                {"ratio": ratio, "lengths": list(lengths)})


def edge_item(verdicts: Sequence) -> Item:
    bad = [v for v in verdicts if not v.passed]
    figure = f"{len(verdicts) - len(bad)}/{len(verdicts)} cases handled, runtime serving after each"
    if bad:
        figure += "; failed: " + "; ".join(f"{v.name} ({v.outcome})" for v in bad)
    return Item("edge", "edge cases and invalid input", FAIL if bad else PASS, figure,
                {"cases": [v.to_json() for v in verdicts]})


def latency_rows(bench_lengths: Sequence) -> list[dict]:
    """Per prompt length: median ms per generated token (from the median decode speed)."""
    rows = []
    for x in bench_lengths:
        tps = x.decode_tps.median if x.decode_tps else None
        rows.append({"prompt_tokens": x.prompt_tokens, "ms_per_token": 1000 / tps if tps else None})
    return rows


# --------------------------------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------------------------------


@dataclass
class ValidateReport:
    model_id: str
    profile: str
    items: list[Item]
    raw: dict

    @property
    def passed(self) -> bool:
        return not any(i.failed for i in self.items)

    def to_json(self) -> dict:
        return {"model_id": self.model_id, "profile": self.profile, "passed": self.passed,
                "items": [i.to_json() for i in self.items], "raw": self.raw}


def validate_markdown(report: dict) -> str:
    lines = [f"# Validate: {report['model_id']} (profile {report['profile']}): "
             f"{'PASS' if report['passed'] else 'FAIL'}", "", "| item | result | figure |", "|---|---|---|"]
    for i in report["items"]:
        lines.append(f"| {i['title']} | {i['status'].upper()} | {i['figure'].replace('|', '/')} |")
    edge = next((i for i in report["items"] if i["key"] == "edge"), None)
    if edge:
        lines += ["", "| edge case | result | outcome |", "|---|---|---|"]
        lines += [f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {c['outcome'].replace('|', '/')} |"
                  for c in edge["detail"]["cases"]]
    return "\n".join(lines) + "\n"


def _hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def run_validate(pipeline, profile, status: Callable[[str], Any] = lambda s: None) -> ValidateReport:
    """Run every checklist item on the installed model of ``pipeline`` (a :class:`scripts.pipeline.Pipeline`)."""

    recipe, spec = pipeline.recipe, pipeline.recipe.validate
    model_dir = pipeline.installed_dir
    qa = pipeline.eval_set()
    convs = conversations(qa, recipe.eval.system_prompt) if qa else [[{"role": "user", "content": p}]
                                                                      for p in DEFAULT_PROMPTS]
    options = {"cache_dir": str(pipeline.cache_root), "model_id": pipeline.model_id}
    tool_cases = pipeline.tool_cases()
    tool_chats, fmt = pipeline.tool_chats(tool_cases)
    context = context_limit(model_dir)
    soak = {"kind": "soak", "conversations": convs[:8], "requests": spec.soak_requests, "max_new_tokens": 8}
    status(f"validate: Foundry Local — {len(convs)} eval prompts, prompt lengths, soak of {spec.soak_requests} requests…")
    main = run_worker("foundry", model_dir, [
        {"kind": "answers", "conversations": convs + tool_chats, "max_new_tokens": recipe.eval.max_new_tokens},
        bench_request(model_dir, profile, context), soak], options)
    jobs = {j["kind"]: j for j in main["jobs"]}
    answers = [a["text"] for a in jobs["answers"]["answers"]]
    answers, tool_texts = answers[:len(convs)], answers[len(convs):]

    status("validate: Foundry Local — edge cases and invalid input…")
    controls = control_tokens(model_dir)
    cases = edge_cases(context, controls)
    edge = run_worker("foundry", model_dir, [{"kind": "edge", "cases": cases, "health": convs[0],
                                              "timeout": spec.edge_timeout_seconds}], options)["jobs"][0]

    reference = tool_reference = None
    source = Path(pipeline.model_dir)
    if (qa or tool_cases) and _hf_folder(source):
        status("validate: FP32 reference answers (PyTorch)…")
        asked = (convs if qa else []) + tool_chats
        ref = run_worker("torch", source, [{"kind": "answers", "conversations": asked,
                                            "max_new_tokens": recipe.eval.max_new_tokens}])
        ref_texts = [a["text"] for a in ref["jobs"][0]["answers"]]
        reference = ref_texts[:len(asked) - len(tool_chats)] if qa else None
        if tool_cases:
            tool_reference = pipeline.score_replies(tool_cases, ref_texts[len(asked) - len(tool_chats):], fmt)
    tool_score = pipeline.score_replies(tool_cases, tool_texts, fmt) if tool_cases else None

    bench_lengths = [summarise_length(x) for x in jobs["bench"]["lengths"]]
    items = [
        domain_item(answers, [x.answer for x in qa], reference, recipe.eval.min_accuracy, spec.min_reference_agreement),
        format_item(answers, spec.format_regex, spec.format_json_keys, controls, spec.min_format_rate),
        leak_item(jobs["soak"]["rss"], jobs["soak"]["n_errors"], spec.max_rss_growth_mb,
                  spec.max_rss_slope_kb_per_request),
        lengths_item(latency_rows(bench_lengths), spec.max_latency_ratio, spec.latency_floor_ms),
        tool_item(tool_score, tool_reference, recipe.eval.min_accuracy),
        edge_item(edge_verdicts(cases, edge)),
    ]
    raw = {"answers": answers, "reference_answers": reference, "tool_answers": tool_texts, "soak": jobs["soak"],
           "lengths": [x.to_json() for x in bench_lengths], "edge": edge, "load_seconds": main["load_seconds"],
           "peak_rss": main["peak_rss"], "context": context, "thresholds": asdict(spec)}
    return ValidateReport(pipeline.model_id, profile.name, items, raw)
