"""``invoke bench-threads``: what ONNX Runtime's intra-op thread count moves on an installed model, measured A/B.

The installed folder is mirrored into one folder per variant (weights hard-linked, only ``genai_config.json``
differs: ``model.decoder.session_options.intra_op_num_threads`` removed for ``default``, else set), and the variants
are measured in alternation, round after round, each in its own worker process (raw ONNX Runtime GenAI, and the
Foundry Local runtime with ``--foundry``): on shared cores, interleaving spreads the other processes' load over
every variant instead of over whichever ran last. Per variant and prompt length: the median over rounds of each
round's median, prefill and decode tokens/s, and the machine's load average around each measurement.

With ``--peer llama.cpp`` the peer's runs (:mod:`scripts.proof.peer_bench`) join every round with the same thread
count as the variant (physical cores for ``default``), so ours ÷ peer is compared at each thread count under the
same load: on an oversubscribed machine a multi-threaded runtime whose threads wait for each other at every
operator (llama.cpp's OpenMP pool) loses far more than one that does not, and only interleaving shows it fairly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.errors import MeasurementError
from scripts.convert.package import mirror_with_config
from scripts.proof.measure import context_limit, measure, Profile
from scripts.proof.peer_bench import PeerRun
from scripts.proof.stats import summarise
from scripts.recipe.runtime import physical_cores

DEFAULT = "default"


def parse_variants(text: str) -> list[int | None]:
    """``"default,1,2"`` → ``[None, 1, 2]`` (None: ONNX Runtime's own choice)."""
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == DEFAULT:
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise MeasurementError(f"--threads: {part!r} is neither {DEFAULT!r} nor a positive whole number "
                                   "(e.g. --threads default,1,2).")
    if len(out) < 2:
        raise MeasurementError("--threads needs at least two variants to compare (e.g. default,2).")
    return list(dict.fromkeys(out))


def variant_config(genai_config: dict, threads: int | None) -> dict:
    """``genai_config`` with ``intra_op_num_threads`` set to ``threads`` (removed for None). Pure."""
    model = genai_config.get("model", {})
    decoder = model.get("decoder", {})
    session = {k: v for k, v in (decoder.get("session_options") or {}).items() if k != "intra_op_num_threads"}
    if threads is not None:
        session["intra_op_num_threads"] = threads
    return {**genai_config, "model": {**model, "decoder": {**decoder, "session_options": session}}}


def mirror(installed: Path, out: Path, threads: int | None) -> Path:
    """``installed`` re-created at ``out`` with hard links, its ``genai_config.json`` rewritten for ``threads``."""
    return mirror_with_config(installed, out, lambda doc: variant_config(doc, threads))


def _name(threads: int | None) -> str:
    return DEFAULT if threads is None else f"{threads} threads"


def run_threads_ab(installed: Path, work: Path, variants: Sequence[int | None], profile: Profile, rounds: int,
                   backends: Sequence[str] = ("genai",), status: Callable[[str], Any] = lambda s: None,
                   peer_runs: Sequence[PeerRun] = ()) -> dict:
    """Measure every variant on every backend (and every peer run, at the variant's thread count) ``rounds`` times,
    interleaved; return plain JSON data."""
    installed = Path(installed)
    folders = {v: mirror(installed, Path(work) / f"threads-{v or DEFAULT}", v) for v in variants}
    context = context_limit(installed)
    plan = [(b, b, folders, None) for b in backends] + [(p.key, p.backend, p.path, p) for p in peer_runs]
    raw: list[dict] = []
    total = rounds * len(plan) * len(variants)
    for r in range(rounds):
        for key, backend, where, peer in plan:
            for v in variants:
                status(f"bench-threads: round {r + 1}/{rounds}, {key}, {_name(v)} ({len(raw) + 1}/{total})…")
                folder = where[v] if peer is None else where
                options = None if peer is None else {**peer.options, "threads": v or physical_cores()}
                before = os.getloadavg()[0]
                result = measure(backend, folder, profile, options, prompt_dir=installed, context=context)
                raw.append({"round": r, "backend": key, "threads": v, "load_before": round(before, 2),
                            "load_after": round(os.getloadavg()[0], 2),
                            "lengths": [x.to_json() for x in result.lengths]})
    return {"model_dir": str(installed), "profile": profile.to_json(), "rounds": rounds, "cpus": os.cpu_count(),
            "variants": [_name(v) for v in variants], "peers": [p.key for p in peer_runs],
            "summary": summarise_ab(raw), "ratios": ab_ratios(summarise_ab(raw), [p.key for p in peer_runs]),
            "runs": raw}


def summarise_ab(raw: list[dict]) -> list[dict]:
    """Per backend, variant and prompt length: median (over rounds) of the per-round medians, and the load. Pure."""
    groups: dict[tuple, list[dict]] = {}
    for run in raw:
        for x in run["lengths"]:
            groups.setdefault((run["backend"], run["threads"], x["target"]), []).append({**x, "load": run["load_before"]})
    out = []
    for (backend, threads, target), xs in groups.items():
        def med(key: str) -> float | None:
            s = summarise([(x[key] or {}).get("median") for x in xs])
            return s.median if s else None
        out.append({"backend": backend, "threads": _name(threads), "target": target,
                    "prompt_tokens": max(x["prompt_tokens"] for x in xs), "rounds": len(xs),
                    "prefill_tps": med("prefill_tps"), "decode_tps": med("decode_tps"), "ttft": med("ttft"),
                    "load_min": min(x["load"] for x in xs), "load_max": max(x["load"] for x in xs)})
    return out


def ab_ratios(summary: list[dict], peers: Sequence[str]) -> list[dict]:
    """Ours ÷ each peer at the same thread variant and prompt length (prefill and decode tok/s). Pure."""
    by = {(s["backend"], s["threads"], s["target"]): s for s in summary}
    out = []
    for (backend, threads, target), ours in sorted(by.items()):
        if backend in peers:
            continue
        for peer in peers:
            p = by.get((peer, threads, target))
            if p:
                out.append({"ours": backend, "peer": peer, "threads": threads, "target": target,
                            "prefill": ours["prefill_tps"] / p["prefill_tps"] if ours["prefill_tps"] and
                            p["prefill_tps"] else None,
                            "decode": ours["decode_tps"] / p["decode_tps"] if ours["decode_tps"] and
                            p["decode_tps"] else None})
    return out


def threads_markdown(data: dict) -> str:
    def f(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"
    lines = [f"# intra_op_num_threads A/B: {data['model_dir']}", "",
             f"{data['rounds']} interleaved rounds × profile {data['profile']['name']} ({data['profile']['warmup']} "
             f"warm-up + {data['profile']['repeats']} runs per length), {data['cpus']} CPUs. Medians over rounds of "
             "each round's median; load = the 1-minute load average before each measurement (min–max).", "",
             "| backend | threads | prompt tokens | TTFT ms | prefill tok/s | decode tok/s | load |",
             "|---|---|---|---|---|---|---|"]
    for s in sorted(data["summary"], key=lambda s: (s["backend"], s["target"], s["threads"])):
        lines.append(f"| {s['backend']} | {s['threads']} | {s['prompt_tokens']} | {f(s['ttft'] and 1000 * s['ttft'])} | "
                     f"{f(s['prefill_tps'], 0)} | {f(s['decode_tps'])} | {s['load_min']:.1f}–{s['load_max']:.1f} |")
    if data.get("ratios"):
        lines += ["", "Ours ÷ the peer at the same thread count (> 1×: ours is faster):", "",
                  "| ours | peer | threads | prompt target | prefill ratio | decode ratio |", "|---|---|---|---|---|---|"]
        def x(v):
            return "–" if v is None else f"{v:.2f}×"
        lines += [f"| {r['ours']} | {r['peer']} | {r['threads']} | {r['target']} | {x(r['prefill'])} | "
                  f"{x(r['decode'])} |" for r in data["ratios"]]
    return "\n".join(lines) + "\n"
