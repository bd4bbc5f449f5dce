"""Measure a model through one backend, in its own process: load time, time to first token, prefill and
decode tokens/s, per-token latency, peak RSS and CPU use, at several prompt lengths, with warm-up and
repeats (this machine's cores are shared: single runs are noise; we keep every run and report the median
and the spread).

Reusable for any model folder (``invoke bench``, ``invoke validate``, ``invoke compare``)::

    from scripts.proof.measure import PROFILES, measure
    result = measure("genai", Path("build/qwen/package"), PROFILES["quick"])   # -> BackendBench
    result.load_seconds, result.peak_rss_mb, result.lengths[0].decode_tps.median

:func:`run_worker` runs any list of jobs (``bench``, ``answers``, ``soak``, ``edge``, ``logits``) on one loaded
model in a worker process (:func:`run_request` through :mod:`scripts.core.workers`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.errors import MeasurementError, SlmopsError
from scripts.proof.edge_cases import run_edge_cases
from scripts.proof.fidelity import compare_window, summarise as summarise_fidelity, window_ids
from scripts.proof.stats import percentile, rates_from_token_times, summarise, Summary
from scripts.runtimes import llamacpp as _llamacpp  # noqa: F401 (registers the "llama.cpp" peer backend)
from scripts.serve import backend as _http  # noqa: F401 (registers the "http" backend: invoke serve's server)
from scripts.runtimes.backends import make_backend, render_chat
from scripts.core.workers import run_in_worker
from scripts.peers import llamacpp

log = logging.getLogger(__name__)

CONTEXT_MARGIN = 16  # tokens kept free beside the chat template's own tokens near the context limit
FILLER = ("The cooperative keeps careful records of every harvest, every delivery and every repair, and the "
          "notes are read aloud at the spring meeting so that each member knows how the season went. ")
INSTRUCTION = "\n\nIn one sentence, what is the text above about?"


@dataclass(frozen=True)
class Profile:
    """How much to measure. ``lengths`` are target prompt lengths in tokens; the longest prompt is
    ``min(context - new_tokens - margin, max_prompt_tokens)`` (near the context window, capped to keep a
    run short on 2 cores)."""

    name: str
    lengths: tuple[int, ...]
    max_prompt_tokens: int
    new_tokens: int
    warmup: int
    repeats: int
    exact_new_tokens: bool = False  # every run generates new_tokens (end of text suppressed), in every runtime
    #: which of the deployed model's backends ``invoke bench`` runs (None: all: foundry, http, genai, torch)
    backends: tuple[str, ...] | None = None
    #: which llama.cpp quantizations a peer run builds and measures (None: the peer's defaults)
    peer_quants: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def runs(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", lengths=(32, 128), max_prompt_tokens=512, new_tokens=32, warmup=1, repeats=3),
    "full": Profile("full", lengths=(16, 64, 256, 1024), max_prompt_tokens=2048, new_tokens=64, warmup=2,
                    repeats=5),
    # the speed issue's scale: prompts of 128, 512 and 2,000 tokens, 128 new tokens; two warm-ups per length (through
    # Foundry Local the request after a single warm-up was at times the slow one at 0.5B/128 tokens)
    "scale": Profile("scale", lengths=(128, 512), max_prompt_tokens=2000, new_tokens=128, warmup=2, repeats=3,
                     exact_new_tokens=True),
    # long prompts (issue 22): 128, 2,000 and 8,192 tokens (or the model's context, if smaller), 128 new tokens. An
    # 8,192-token prefill of the 0.5B shape takes ~a minute on 2 cores, so: one warm-up + two runs, the in-process
    # runtimes only (Foundry Local and raw GenAI on the same graph), and llama.cpp's Q4_0 as the peer.
    "long": Profile("long", lengths=(128, 2000), max_prompt_tokens=8192, new_tokens=128, warmup=1, repeats=2,
                    exact_new_tokens=True, backends=("foundry", "genai"), peer_quants=("q4_0",)),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise MeasurementError(f"Unknown profile {name!r}; choose one of: {', '.join(PROFILES)}.")
    return PROFILES[name]


# --------------------------------------------------------------------------------------------------
# Prompts (parent side; tokenizers only)
# --------------------------------------------------------------------------------------------------


def context_limit(model_dir: Path) -> int:
    """Usable context of a folder: ONNX GenAI ``min(context_length, search.max_length)``, else the HF
    ``max_position_embeddings``."""
    model_dir = Path(model_dir)
    cfg = model_dir / "genai_config.json"
    if cfg.is_file():
        doc = json.loads(cfg.read_text(encoding="utf-8"))
        limits = [doc["model"].get("context_length"), (doc.get("search") or {}).get("max_length")]
        return min(int(x) for x in limits if x)
    doc = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(doc.get("max_position_embeddings") or 2048)


def prompt_lengths(profile: Profile, context: int, margin: int = CONTEXT_MARGIN) -> list[int]:
    """Sorted target prompt lengths: the profile's that fit, plus one near the context limit (capped)."""
    top = min(context - profile.new_tokens - margin, profile.max_prompt_tokens)
    if top < 8:
        raise MeasurementError(f"A context of {context} tokens leaves no room for a prompt and "
                               f"{profile.new_tokens} new tokens; lower the profile's new_tokens.")
    return sorted({n for n in profile.lengths if n < top} | {top})


def template_overhead(model_dir: Path) -> int:
    """Tokens the chat template and the instruction add around the filler."""
    tok = fast_tokenizer(model_dir)
    return len(tok.encode(render_chat(model_dir, [{"role": "user", "content": INSTRUCTION}]),
                          add_special_tokens=False).ids)


def fast_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise MeasurementError(f"{model_dir} has no tokenizer.json; cannot build prompts of a given length.")
    return Tokenizer.from_file(str(path))


def filler_text(model_dir: Path, n_tokens: int) -> str:
    """Neutral text of about ``n_tokens`` tokens in this model's tokenizer."""
    tok = fast_tokenizer(model_dir)
    per = max(1, len(tok.encode(FILLER, add_special_tokens=False).ids))
    ids = tok.encode(FILLER * (n_tokens // per + 2), add_special_tokens=False).ids[:max(n_tokens, 0)]
    return tok.decode(ids)


def length_prompts(model_dir: Path, lengths: Sequence[int]) -> list[tuple[int, list[dict]]]:
    """``(target total prompt tokens, messages)`` for each length."""
    overhead = template_overhead(model_dir)
    return [(n, [{"role": "user", "content": filler_text(model_dir, max(n - overhead, 1)) + INSTRUCTION}])
            for n in lengths]


# --------------------------------------------------------------------------------------------------
# Worker side: jobs run on one loaded backend
# --------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_job(backend, job: dict) -> dict:
    """For each prompt: ``warmup`` untimed runs, then ``repeats`` timed runs; every run's raw figures."""
    out = []
    exact = bool(job.get("exact"))
    for target, messages in job["prompts"]:
        for _ in range(job["warmup"]):
            backend.generate(messages, job["new_tokens"], exact=exact)
        runs = []
        cpu0, wall0 = backend.cpu_seconds(), time.perf_counter()
        for _ in range(job["repeats"]):
            tr = backend.generate(messages, job["new_tokens"], exact=exact)
            rates = rates_from_token_times(tr.start, tr.token_times, tr.prompt_tokens)
            if tr.new_tokens > len(tr.token_times) > 1:  # streamed pieces may merge tokens: use the count
                rates["decode_tps"] = (tr.new_tokens - 1) / (tr.token_times[-1] - tr.token_times[0])
            runs.append({**rates, "prompt_tokens": tr.prompt_tokens, "new_tokens": tr.new_tokens,
                         "total_seconds": (tr.token_times[-1] if tr.token_times else time.perf_counter()) - tr.start})
        wall = time.perf_counter() - wall0
        out.append({"target": target, "runs": runs,
                    "cpu_percent": 100 * (backend.cpu_seconds() - cpu0) / wall if wall > 0 else None})
    return {"lengths": out}


def answers_job(backend, job: dict) -> dict:
    """Greedy answers to each conversation (for accuracy and format checks)."""
    answers = []
    for conv in job["conversations"]:
        tr = backend.generate(conv, job["max_new_tokens"])
        answers.append({"text": tr.text, "tokens": tr.new_tokens,
                        "seconds": (tr.token_times[-1] if tr.token_times else tr.start) - tr.start})
    return {"answers": answers}


def soak_job(backend, job: dict) -> dict:
    """``requests`` short requests on the loaded model; RSS and latency after each."""
    convs = job["conversations"]
    rss, seconds, errors = [], [], []
    for i in range(job["requests"]):
        t0 = time.perf_counter()
        try:
            backend.generate(convs[i % len(convs)], job["max_new_tokens"])
        except SlmopsError as exc:
            errors.append(f"request {i}: {exc}")
        seconds.append(time.perf_counter() - t0)
        rss.append(rss_bytes())
    return {"rss": rss, "seconds": seconds, "errors": errors[:10], "n_errors": len(errors)}


def _edge_job(backend, job: dict) -> dict:
    return run_edge_cases(backend, job)


def logits_job(backend, job: dict) -> dict:
    """Teacher-forced next-token figures over token windows (for perplexity and greedy-token agreement): per
    position, the greedy (argmax) prediction and the negative log-likelihood of the true next token."""
    import numpy as np
    windows = []
    for ids in job["windows"]:
        logits = np.asarray(backend.score(ids), dtype=np.float64)[:len(ids) - 1]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = np.asarray(ids[1:])
        windows.append({"argmax": logits.argmax(axis=-1).astype(int).tolist(),
                        "nll": (-logp[np.arange(len(targets)), targets]).tolist()})
    return {"windows": windows}


def fidelity_job(backend, job: dict) -> dict:
    """The loaded (candidate) backend against ``job["reference_dir"]``, loaded alongside it in the same runtime, over
    ``job["windows"]`` (teacher-forced): KLD, top-1 agreement and perplexities (:mod:`scripts.proof.fidelity`). The
    per-token lists stay in the worker; the summary comes back."""
    reference = make_backend(backend.name, Path(job["reference_dir"]))
    reference.load()
    try:
        per_window = [compare_window(backend.score(window_ids(w)), reference.score(window_ids(w)), w)
                      for w in job["windows"]]
    finally:
        reference.close()
    return summarise_fidelity(per_window).to_json()


JOBS: dict[str, Callable[[Any, dict], dict]] = {"bench": bench_job, "answers": answers_job, "soak": soak_job,
                                                 "edge": _edge_job, "logits": logits_job, "fidelity": fidelity_job}


def run_request(request: dict) -> dict:
    """Load the backend once, run each job, report load time and memory (in this process)."""
    backend = make_backend(request["backend"], Path(request["model_dir"]), **(request.get("options") or {}))
    rss_before = rss_bytes()
    peak = None
    try:
        load_seconds = backend.load()
        rss_loaded = rss_bytes()
        results = []
        for job in request.get("jobs", []):
            if job["kind"] not in JOBS:
                raise MeasurementError(f"Unknown job {job['kind']!r}; known: {', '.join(JOBS)}.")
            t0 = time.perf_counter()
            results.append({"kind": job["kind"], **JOBS[job["kind"]](backend, job),
                            "seconds": time.perf_counter() - t0})
        peak = backend.peak_rss_bytes()  # a backend whose model lives in another process (http) reports that one's
    finally:
        backend.close()
    return {"backend": request["backend"], "load_seconds": load_seconds, "rss_before_load": rss_before,
            "rss_after_load": rss_loaded, "peak_rss": peak or peak_rss_bytes(), "jobs": results,
            "cpu_count": os.cpu_count()}


#: What to say when a backend's worker dies natively (a crash, no Python error to report).
CRASH_HINTS = {llamacpp.NAME: llamacpp.CRASH_HINT}


def run_worker(backend: str, model_dir: Path, jobs: list[dict], options: dict | None = None,
               timeout: float = 3600) -> dict:
    """Run ``jobs`` on ``model_dir`` loaded in ``backend``, in a fresh worker process (:mod:`scripts.core.workers`);
    return its result. Raises :class:`MeasurementError` with the worker's cause and stderr tail."""
    request = {"backend": backend, "model_dir": str(Path(model_dir).resolve()), "options": options or {},
               "jobs": jobs}
    return run_in_worker("scripts.proof.measure:run_request", request, error=MeasurementError,
                         what=f"measuring {model_dir} with {backend}", timeout=timeout,
                         hint="use a smaller profile or raise the timeout", crash_hint=CRASH_HINTS.get(backend, ""))


@dataclass
class LengthResult:
    """Figures at one prompt length, each summarised over the timed runs."""

    target: int
    prompt_tokens: int
    new_tokens: int
    ttft: Summary | None
    prefill_tps: Summary | None
    decode_tps: Summary | None
    token_ms: Summary | None  # per-token latency over every gap of every run (p50 = median; p95 below)
    token_ms_p95: float | None
    cpu_percent: float | None

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("ttft", "prefill_tps", "decode_tps", "token_ms"):
            d[k] = getattr(self, k).to_json() if getattr(self, k) else None
        return d


def summarise_length(raw: dict) -> LengthResult:
    """Pure: the raw runs of one prompt length → medians, spreads and the p95 per-token latency."""
    runs = raw["runs"]
    gaps_ms = [1000 * g for r in runs for g in r["token_latencies"]]
    return LengthResult(
        target=raw["target"],
        prompt_tokens=max((r["prompt_tokens"] for r in runs), default=0),
        new_tokens=max((r["new_tokens"] for r in runs), default=0),
        ttft=summarise([r["ttft"] for r in runs]),
        prefill_tps=summarise([r["prefill_tps"] for r in runs]),
        decode_tps=summarise([r["decode_tps"] for r in runs]),
        token_ms=summarise(gaps_ms),
        token_ms_p95=percentile(gaps_ms, 95) if gaps_ms else None,
        cpu_percent=raw.get("cpu_percent"),
    )


@dataclass
class BackendBench:
    backend: str
    model_dir: str
    size_bytes: int
    load_seconds: float
    rss_before_load_mb: float
    peak_rss_mb: float
    cpu_count: int
    lengths: list[LengthResult] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["lengths"] = [x.to_json() for x in self.lengths]
        return d

    @property
    def decode_tps(self) -> float | None:
        """Median decode speed at the shortest prompt (the figure the bandwidth bound is about)."""
        first = self.lengths[0].decode_tps if self.lengths else None
        return first.median if first else None


def weights_size(model_dir: Path) -> int:
    """Bytes of weight files (ONNX model + external data, or safetensors/bin; a single file such as a GGUF: its size)."""
    if Path(model_dir).is_file():
        return Path(model_dir).stat().st_size
    patterns = ("*.onnx", "*.onnx.data", "*.safetensors", "*.bin")
    return sum(p.stat().st_size for pat in patterns for p in Path(model_dir).glob(pat) if p.is_file())


def bench_request(model_dir: Path, profile: Profile, context: int | None = None) -> dict:
    """The ``bench`` job for ``model_dir``'s tokenizer and context."""
    lengths = prompt_lengths(profile, context or context_limit(model_dir))
    return {"kind": "bench", "prompts": length_prompts(model_dir, lengths), "new_tokens": profile.new_tokens,
            "warmup": profile.warmup, "repeats": profile.repeats, "exact": profile.exact_new_tokens}


def to_backend_bench(backend: str, model_dir: Path, result: dict) -> BackendBench:
    bench = next(j for j in result["jobs"] if j["kind"] == "bench")
    return BackendBench(backend, str(model_dir), weights_size(model_dir), result["load_seconds"],
                        result["rss_before_load"] / 1e6, result["peak_rss"] / 1e6, result["cpu_count"],
                        [summarise_length(x) for x in bench["lengths"]])


def measure(backend: str, model_dir: Path, profile: Profile, options: dict | None = None,
            prompt_dir: Path | None = None, context: int | None = None, timeout: float = 3600) -> BackendBench:
    """Bench one backend on one folder in its own process. ``prompt_dir`` is the folder whose tokenizer
    builds the prompts (default ``model_dir``); ``context`` overrides the folder's context limit (so every
    backend gets the same prompts)."""
    job = bench_request(prompt_dir or model_dir, profile, context)
    return to_backend_bench(backend, model_dir, run_worker(backend, model_dir, [job], options, timeout))


