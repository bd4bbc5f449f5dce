"""Fidelity of a converted graph to its FP32 reference, the way llama.cpp's ``perplexity --kl-divergence`` reports
it: on held-out real English text, teacher-forced, per token — KL divergence of the candidate's next-token
distribution from the reference's (mean and p99), top-1 agreement (same most likely next token), and perplexity of
both (ΔPPL). Scored through ONNX Runtime GenAI on the converted graphs, the graphs Foundry Local runs.

Held-out text: the documentation topics shipped with Python itself (:mod:`scripts.core.english_text`).

The measuring worker (:mod:`scripts.proof.measure`, job ``fidelity``) loads both graphs and calls
:func:`compare_window` per window; everything here is pure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

DEFAULT_WINDOW = 512


def token_windows(ids: Sequence[int], window: int, total: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens covering the first ``total`` tokens (the last partial one dropped)."""
    ids = list(ids)[:total]
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def log_softmax(logits):
    import numpy as np
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_ids(window) -> list[int]:
    """The token ids of a window: a plain list (held-out text: every position scored), or ``{"ids", "from"}`` (an
    eval answer after its prompt: only the positions that predict answer tokens are scored)."""
    return list(window["ids"] if isinstance(window, dict) else window)


def answer_window(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> dict[str, Any]:
    """A window that scores only the answer: the prompt (the chat template rendered up to the assistant turn) then the
    reference answer's tokens; position ``from`` is the first that predicts an answer token."""
    return {"ids": [*prompt_ids, *answer_ids], "from": len(prompt_ids) - 1}


def compare_window(candidate_logits, reference_logits, window) -> dict[str, list]:
    """Per scored position (each predicts the next token of the window): KL(reference ‖ candidate), whether the top-1
    tokens agree, and each model's negative log-likelihood of the true next token."""
    import numpy as np
    ids = window_ids(window)
    start = window.get("from", 0) if isinstance(window, dict) else 0
    n = len(ids) - 1
    lc, lr = log_softmax(candidate_logits)[start:n], log_softmax(reference_logits)[start:n]
    targets = np.asarray(ids[start + 1:])
    rows = np.arange(n - start)
    kld = (np.exp(lr) * (lr - lc)).sum(axis=-1)
    return {"kld": np.maximum(kld, 0.0).tolist(), "top1": (lc.argmax(-1) == lr.argmax(-1)).tolist(),
            "nll": (-lc[rows, targets]).tolist(), "nll_reference": (-lr[rows, targets]).tolist()}


@dataclass(frozen=True)
class Fidelity:
    tokens: int
    kld_mean: float
    kld_p99: float
    top1: float
    perplexity: float
    perplexity_reference: float

    @property
    def ppl_increase(self) -> float:
        """ΔPPL as a fraction of the reference's perplexity."""
        return self.perplexity / self.perplexity_reference - 1.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ppl_increase": self.ppl_increase}


def summarise(windows: Sequence[dict[str, list]]) -> Fidelity:
    """The per-window figures of :func:`compare_window` → one :class:`Fidelity`."""
    import numpy as np
    kld = np.concatenate([w["kld"] for w in windows])
    return Fidelity(tokens=int(kld.size), kld_mean=float(kld.mean()), kld_p99=float(np.percentile(kld, 99)),
                    top1=float(np.mean(np.concatenate([w["top1"] for w in windows]))),
                    perplexity=float(np.exp(np.mean(np.concatenate([w["nll"] for w in windows])))),
                    perplexity_reference=float(np.exp(np.mean(np.concatenate([w["nll_reference"] for w in windows])))))


MEASURES = ("kld", "top1", "ppl")


def failures(figures: dict[str, Any], spec, measures: Sequence[str] = MEASURES) -> list[str]:
    """What ``figures`` (a :meth:`Fidelity.to_json`) misses of ``spec`` (the recipe's ``conversion.fidelity``:
    ``max_kld``, ``min_top1``, ``max_ppl_increase``), one phrase each, among ``measures``; empty when all are met."""
    out = []
    if "kld" in measures and figures["kld_mean"] > spec.max_kld:
        out.append(f"mean KLD {figures['kld_mean']:.4f} > {spec.max_kld}")
    if "top1" in measures and figures["top1"] < spec.min_top1:
        out.append(f"top-1 agreement {100 * figures['top1']:.1f} % < {100 * spec.min_top1:.0f} %")
    if "ppl" in measures and figures["ppl_increase"] > spec.max_ppl_increase:
        out.append(f"ΔPPL {100 * figures['ppl_increase']:+.1f} % > {100 * spec.max_ppl_increase:.0f} %")
    return out
