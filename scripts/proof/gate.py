"""The fidelity gate of every deploy: the build about to be installed against the FP32 ONNX build of the same
(fine-tuned) model, both through ONNX Runtime GenAI, teacher-forced:

- **domain**: on the eval set's own reference answers, each after its prompt rendered with the package's chat
  template (only the positions that predict answer tokens are scored): does the shipped model still say what the
  fine-tune taught, token for token?
- **held-out**: on ``conversion.fidelity.heldout_tokens`` tokens of real English (:mod:`scripts.proof.fidelity`):
  did quantization damage the model outside the domain?

Each is held to the recipe's ``conversion.fidelity``: the domain to all three (mean KLD, top-1 agreement, ΔPPL), the
held-out text to the distribution measures (mean KLD, ΔPPL) only. Off its domain a small fine-tune's next-token
distributions are flat, and there top-1 agreement flips on noise: the demo model's INT4 build agreed with FP32 on 83 %
of held-out top-1 tokens at a mean KLD of 0.027 (100 % and 0.0000 on its answers); random weights gave 78 % at
0.0002. A build that misses is not installed. Building the windows and judging are pure; :func:`measure_gate` runs one GenAI worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from scripts.core.english_text import heldout_text
from scripts.core.evalset import QA, question_messages
from scripts.core.hf_folder import read_chat_template
from scripts.core.tool_evalset import ToolCase
from scripts.families.tools import calls_text, served_cases, serving_spec
from scripts.proof.fidelity import answer_window, DEFAULT_WINDOW, failures, token_windows
from scripts.proof.measure import context_limit, fast_tokenizer, run_worker
from scripts.runtimes.backends import render_chat

#: What each kind is judged on (:func:`scripts.proof.fidelity.failures`).
MEASURES = {"domain": ("kld", "top1", "ppl"), "heldout": ("kld", "ppl")}
KINDS = tuple(MEASURES)


def heldout_windows(tokenizer_dir: Path, context: int, tokens: int) -> list[list[int]]:
    """The held-out text (:func:`scripts.core.english_text.heldout_text`) in windows that fit the context."""
    ids = fast_tokenizer(tokenizer_dir).encode(heldout_text(), add_special_tokens=False).ids
    return token_windows(ids, min(DEFAULT_WINDOW, context), tokens)


def domain_windows(chat_dir: Path, qa: Sequence[QA], system: str | None, context: int) -> list[dict[str, Any]]:
    """One window per eval item: its question rendered with ``chat_dir``'s chat template (what Foundry Local applies),
    then its reference answer; windows longer than the context are left out."""
    tokenizer = fast_tokenizer(chat_dir)
    windows = []
    for item in qa:
        prompt = tokenizer.encode(render_chat(chat_dir, question_messages(item.question, system)),
                                  add_special_tokens=False).ids
        answer = tokenizer.encode(item.answer, add_special_tokens=False).ids
        if answer and len(prompt) + len(answer) <= context:
            windows.append(answer_window(prompt, answer))
    return windows


def tool_windows(chat_dir: Path, cases: Sequence[ToolCase], context: int) -> list[dict[str, Any]]:
    """One window per held-out call case of a tool set: the conversation as ``invoke serve`` writes it for
    ``chat_dir``'s chat template (the tools in its family's format) rendered by that template, then the expected
    calls as the family writes them; none when the template has no tool format (the check step says so)."""
    calls = [case for case in cases if case.expected]
    served = served_cases(serving_spec(read_chat_template(chat_dir)), calls)
    if served is None:
        return []
    conversations, fmt = served
    tokenizer = fast_tokenizer(chat_dir)
    windows = []
    for case, messages in zip(calls, conversations):
        prompt = tokenizer.encode(render_chat(chat_dir, messages), add_special_tokens=False).ids
        answer = tokenizer.encode(calls_text(fmt, case.expected), add_special_tokens=False).ids
        if len(prompt) + len(answer) <= context:
            windows.append(answer_window(prompt, answer))
    return windows


def gate_windows(package: Path, qa: Sequence[QA], system: str | None, heldout_tokens: int,
                 tool_cases: Sequence[ToolCase] = ()) -> dict[str, list]:
    """The windows of both kinds for ``package`` (its tokenizer, chat template and context): domain = the eval
    set's answers and the tool set's held-out calls."""
    context = context_limit(package)
    return {"domain": domain_windows(package, qa, system, context) + tool_windows(package, tool_cases, context),
            "heldout": heldout_windows(package, context, heldout_tokens)}


@dataclass(frozen=True)
class GateResult:
    """Fidelity figures (:meth:`~scripts.proof.fidelity.Fidelity.to_json`) per kind, and what each misses."""

    figures: dict[str, dict[str, Any]]
    problems: dict[str, list[str]]
    seconds: float

    @property
    def passed(self) -> bool:
        return not any(self.problems.values())

    def to_json(self) -> dict[str, Any]:
        return {"figures": self.figures, "problems": self.problems, "seconds": self.seconds, "passed": self.passed}


def judge(figures: dict[str, dict[str, Any]], spec) -> dict[str, list[str]]:
    """Pure: what each kind's figures miss of ``spec`` (``conversion.fidelity``)."""
    return {kind: failures(figs, spec, MEASURES[kind]) for kind, figs in figures.items()}


def describe(figures: dict[str, dict[str, Any]]) -> str:
    """One line: top-1, mean KLD and ΔPPL per kind."""
    return "; ".join(f"{kind}: top-1 {100 * f['top1']:.1f} %, mean KLD {f['kld_mean']:.4f}, ΔPPL "
                     f"{100 * f['ppl_increase']:+.1f} % ({f['tokens']} tokens)" for kind, f in figures.items())


def failure_message(result: GateResult, recipe_arg: str, precision: str) -> str:
    """What failed, that nothing was installed, and what to run (``recipe_arg``: the recipe as ``--model`` takes it)."""
    missed = "; ".join(f"{kind}: {', '.join(p)}" for kind, p in result.problems.items() if p)
    return (f"The {precision} build keeps too little of the FP32 model it was converted from ({missed}); it was not "
            f"installed (the previous install, if any, is unchanged). Measured: {describe(result.figures)}. "
            f"To fix: `invoke deploy --model {recipe_arg} --precision auto` measures the layouts and deploys the "
            f"smallest that keeps the fidelity (`invoke tune --model {recipe_arg}`: the fastest, keys to paste); to "
            "accept this loss, lower conversion.fidelity (max_kld, min_top1, max_ppl_increase) in the recipe.")


def measure_gate(package: Path, reference: Path, windows: dict[str, list], spec, timeout: float = 3600) -> GateResult:
    """Score ``package`` against ``reference`` (both GenAI folders, loaded side by side in one worker) on the windows
    of each kind (empty kinds are left out), and judge them against ``spec``."""
    kinds = [k for k in KINDS if windows.get(k)]
    jobs = [{"kind": "fidelity", "windows": windows[k], "reference_dir": str(reference)} for k in kinds]
    result = run_worker("genai", package, jobs, timeout=timeout)
    figures = {k: {key: v for key, v in job.items() if key not in ("kind", "seconds")}
               for k, job in zip(kinds, result["jobs"])}
    return GateResult(figures, judge(figures, spec), round(sum(j["seconds"] for j in result["jobs"]), 2))
