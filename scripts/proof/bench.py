"""`invoke bench`: the deployed model through the Foundry Local runtime, compared with raw ONNX Runtime GenAI
on the same folder and with the original PyTorch (FP32) model, each in its own process, with the same
prompts; plus the machine's memory bandwidth and decode speed as a fraction of the bandwidth bound. With
``peer``, a peer runtime (llama.cpp) on the same weights joins the same table (:mod:`scripts.proof.peer_bench`).
Every backend's entry records its thread count and the machine's load average while it ran."""
from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.convert.package import mirror_with_config
from scripts.core.errors import MeasurementError
from scripts.proof.bandwidth import bound_tokens_per_s, bytes_per_token, fraction_of_bound, measure_bandwidth
from scripts.proof.measure import Profile, bench_request, context_limit, run_worker, to_backend_bench
from scripts.proof.peer_bench import deployed_rows, get_peer, peer_markdown, peer_ratios, PeerRun, runtime_threads

log = logging.getLogger(__name__)

BACKEND_LABELS = {"foundry": "Foundry Local runtime", "http": "Foundry Local over HTTP (invoke serve)",
                  "genai": "ONNX Runtime GenAI (raw)", "torch": "PyTorch FP32 (original)"}


def _hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _load_average() -> list[float]:
    import os
    return [round(x, 2) for x in os.getloadavg()]


def run_bench(pipeline, profile: Profile, status: Callable[[str], Any] = lambda s: None,
              peer: str | None = None, extra: Sequence[PeerRun] = (), rounds: int = 1) -> dict:
    """Bench every backend available for ``pipeline``'s recipe (``extra`` runs after raw GenAI, e.g.
    :func:`scripts.proof.run.fp32_run`; then ``peer``'s runs), ``rounds`` times interleaved, each backend's runs pooled;
    return plain JSON data."""
    if rounds < 1:
        raise MeasurementError(f"--rounds must be 1 or more (got {rounds}).")
    import os
    chosen = get_peer(peer) if peer else None
    if chosen:
        chosen.require()  # not installed: say how to get it before measuring anything
    installed, source = pipeline.installed_dir, Path(pipeline.model_dir)
    context = context_limit(installed)
    foundry = {"cache_dir": str(pipeline.cache_root), "model_id": pipeline.model_id}
    if profile.exact_new_tokens:  # Foundry Local reads the minimum length from the folder only
        installed = fixed_length_copy(installed, pipeline.paths.root / "bench" / "fixed-length")
        foundry = {"cache_dir": str(pipeline.paths.root / "bench" / "foundry-cache"),
                   "model_id": f"{pipeline.recipe.foundry.name}-fixed-length:{pipeline.recipe.foundry.version}"}
    peer_runs, peer_info = chosen.plan(pipeline, context, status, profile.peer_quants) if chosen else ([], None)
    status("bench: measuring memory bandwidth…")
    load_at_start = _load_average()
    bw = measure_bandwidth()
    job = bench_request(installed, profile, context)
    threads = runtime_threads(installed)
    plan = [PeerRun(n, n, BACKEND_LABELS[n], installed, o) for n, o in (("foundry", foundry), ("http", foundry),
                                                                           ("genai", {})) if profile.runs(n)]
    plan += list(extra)
    notes = []
    if profile.runs("torch") and _hf_folder(source):
        plan.append(PeerRun("torch", "torch", BACKEND_LABELS["torch"], source, {}))
    elif profile.runs("torch"):
        notes.append(f"PyTorch not measured: {source} is not a Hugging Face folder with safetensors weights.")
    plan += peer_runs
    raw: dict[str, list[dict]] = {run.key: [] for run in plan}
    loads: dict[str, list[list[float]]] = {run.key: [] for run in plan}
    for r in range(rounds):  # interleaved: every backend once per round, so a load change hits them all alike
        for i, run in enumerate(plan, 1):
            status(f"bench: round {r + 1}/{rounds}, {run.label} ({i}/{len(plan)}), {len(job['prompts'])} prompt "
                   f"lengths × ({profile.warmup} warm-up + {profile.repeats} runs)…")
            loads[run.key].append(_load_average())
            raw[run.key].append(run_worker(run.backend, run.path, [job], run.options))
            loads[run.key].append(_load_average())
    backends = []
    for run in plan:
        result = to_backend_bench(run.backend, run.path, pool_rounds(raw[run.key]))
        bpt = bytes_per_token(run.path)
        entry = result.to_json()
        entry.update(key=run.key, label=run.label, peer=run in peer_runs, bytes_per_token=bpt,
                     bound_tps=bound_tokens_per_s(bpt, bw.gb_per_s),
                     fraction_of_bound=fraction_of_bound(result.decode_tps, bpt, bw.gb_per_s),
                     threads=run.options.get("threads") if run in peer_runs else
                     (threads if run.backend in ("foundry", "http", "genai") else None),
                     load_average={"before": loads[run.key][0], "after": loads[run.key][-1],
                                   "max": max(x[0] for x in loads[run.key])}, rounds=rounds)
        backends.append(entry)
    if peer_info:
        peer_info["ratios"] = peer_ratios(backends)
    by = deployed_rows(backends)
    g = by["genai"]["lengths"][0]["decode_tps"] if "genai" in by else None
    bursty = [BACKEND_LABELS[k] for k in ("foundry", "http") if k in by and g and by[k]["lengths"][0]["decode_tps"]
              and by[k]["lengths"][0]["decode_tps"]["median"] > 2 * g["median"]]
    if bursty:
        notes.append(f"{' and '.join(bursty)} streamed this model's tokens in bursts (it generates faster than Python "
                     "reads the stream): per-token gaps and decode tok/s there measure the reader, not the runtime. "
                     "Trust the TTFT and the raw GenAI decode figure, which runs the same graph.")
    if "foundry" in by and "http" in by:
        f, h = (by[k]["lengths"][0] for k in ("foundry", "http"))
        if f["ttft"] and h["ttft"]:
            notes.append(f"Over HTTP (`invoke serve`, the openai client streaming in another process) the first token "
                         f"came {1000 * (h['ttft']['median'] - f['ttft']['median']):+.1f} ms later than in-process; its "
                         "load time is the server's whole start (process, runtime, model) and its RSS and CPU % are "
                         "the server process's.")
    if backends and backends[0]["bytes_per_token"] < 64e6:
        notes.append("The weights read per token fit in the CPU caches, so DRAM bandwidth does not bound this "
                     "model: its fraction of the bound mostly shows per-token overhead.")
    notes.append("2 shared cores: other processes ran during the measurement; compare the medians and mind "
                 "the spread (± half the interquartile range, relative to the median).")
    if (note := oversubscription_note(backends, os.cpu_count() or 1, peer)) is not None:
        notes.append(note)
    if threads is None:
        notes.append("The deployed genai_config.json sets no intra_op_num_threads: ONNX Runtime chose its own thread "
                     "count (recipe runtime.intra_op_threads sets it at the package step).")
    return {"recipe": pipeline.recipe.name, "model_id": pipeline.model_id, "profile": profile.to_json(),
            "rounds": rounds,
            "context": context, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "load_average_at_start": load_at_start},
            "bandwidth": bw.to_json(), "backends": backends, "peer": peer_info, "notes": notes}


def pool_rounds(results: list[dict]) -> dict:
    """One worker result from several rounds of the same bench job: every timed run of every round per prompt length
    (medians are then over all of them), the median load time, the highest peak RSS, the mean CPU %. Pure."""
    first = results[0]
    bench = [next(j for j in r["jobs"] if j["kind"] == "bench") for r in results]
    lengths = []
    for i, x in enumerate(bench[0]["lengths"]):
        cpus = [b["lengths"][i]["cpu_percent"] for b in bench if b["lengths"][i].get("cpu_percent") is not None]
        lengths.append({"target": x["target"], "runs": [run for b in bench for run in b["lengths"][i]["runs"]],
                        "cpu_percent": sum(cpus) / len(cpus) if cpus else None})
    loads = sorted(r["load_seconds"] for r in results)
    return {**first, "load_seconds": loads[len(loads) // 2], "peak_rss": max(r["peak_rss"] for r in results),
            "jobs": [{"kind": "bench", "lengths": lengths}]}


def fixed_length_copy(model_dir: Path, dest: Path) -> Path:
    """``dest`` (replaced): ``model_dir``'s files hard-linked, its ``genai_config.json`` with ``search.min_length`` =
    ``max_length``, so that Foundry Local and GenAI generate exactly the tokens asked (end of text suppressed) — the
    bench's decode figures are then over the same number of tokens in every runtime, whatever the model would say."""
    return mirror_with_config(model_dir, dest, lambda doc: {**doc, "search": {**doc["search"],
                                                                              "min_length": doc["search"]["max_length"]}})


def oversubscription_note(backends: list[dict], cpus: int, peer: str | None = None) -> str | None:
    """A note when the load average around any backend's run exceeded the CPU count (None otherwise). Pure."""
    busiest = max((x for b in backends for x in (b["load_average"]["before"][0], b["load_average"]["after"][0],
                                                 b["load_average"].get("max", 0.0))), default=0.0)
    if busiest <= cpus:
        return None
    return (f"The machine was oversubscribed (1-minute load average up to {busiest:.1f} on {cpus} CPUs): "
            "multi-threaded figures suffer most, and a runtime whose threads wait for each other at every operator "
            "(llama.cpp's OpenMP pool) more than ONNX Runtime; `invoke bench-threads --threads 1,2"
            + (f" --peer {peer}" if peer else "") + "` compares thread counts interleaved.")


def _f(x, digits=1, scale=1.0) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _s(summary: dict | None, digits=1, scale=1.0) -> str:
    if not summary:
        return "–"
    half = 100 * summary["spread"] / 2
    return f"{summary['median'] * scale:.{digits}f}" + (f" ±{half:.0f}%" if summary["n"] > 1 else "")


def _load(avg: dict | None) -> str:
    return f"{avg['before'][0]:.1f} → {avg['after'][0]:.1f}" if avg else "–"


def _new_tokens(profile: dict) -> str:
    if profile.get("exact_new_tokens"):
        return (f"exactly {profile['new_tokens']} new tokens per run (end of text suppressed: Foundry Local and GenAI "
                "run a hard-linked copy of the installed folder whose genai_config.json sets search.min_length = "
                "max_length; llama.cpp and PyTorch suppress it per request)")
    return f"up to {profile['new_tokens']} new tokens (a reply may end sooner)"


def bench_markdown(data: dict) -> str:
    """Two tables: one line per backend (figures at the shortest prompt), then every prompt length."""
    bw = data["bandwidth"]
    p = data["profile"]
    lines = [f"# Bench: {data['model_id']} (recipe {data['recipe']}, profile {p['name']})", "",
             f"Memory read bandwidth: **{bw['gb_per_s']:.1f} GB/s** (±{100 * bw['spread'] / 2:.0f}%, {bw['method']}). "
             f"Context {data['context']} tokens; {p['warmup']} warm-up + {p['repeats']} timed runs per prompt length, "
             f"{_new_tokens(p)}, greedy. Medians ± half the interquartile range"
             + (f", over {data['rounds']} interleaved rounds (every backend once per round, its runs pooled)."
                if data.get("rounds", 1) > 1 else "."), "",
             "| backend | weights MB | load s | TTFT ms | prefill tok/s | decode tok/s | ms/token p50 / p95 | peak RSS MB | CPU % | MB read/token | bound tok/s | decode / bound | threads | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in data["backends"]:
        x = b["lengths"][0] if b["lengths"] else {}
        tm = x.get("token_ms") or {}
        lines.append(f"| {b['label']} | {b['size_bytes'] / 1e6:.1f} | {b['load_seconds']:.2f} | {_s(x.get('ttft'), 1, 1000)} | "
                     f"{_s(x.get('prefill_tps'), 0)} | {_s(x.get('decode_tps'), 1)} | {_f(tm.get('median'), 2)} / "
                     f"{_f(x.get('token_ms_p95'), 2)} | {b['peak_rss_mb']:.0f} | {_f(x.get('cpu_percent'), 0)} | "
                     f"{b['bytes_per_token'] / 1e6:.2f} | {b['bound_tps']:.0f} | "
                     f"{_f(b['fraction_of_bound'] and 100 * b['fraction_of_bound'], 1)} % | {b.get('threads') or 'default'} | "
                     f"{_load(b.get('load_average'))} |")
    lines += ["", f"First table: shortest prompt ({data['backends'][0]['lengths'][0]['prompt_tokens'] if data['backends'] else '–'} "
              "tokens). CPU % is process CPU time ÷ wall time (100 % = one core busy). Threads: ONNX Runtime intra-op "
              "threads (default: ONNX Runtime's choice) or the peer's; load avg: the machine's 1-minute load average "
              f"before → after the backend ran ({data['machine'].get('cpus')} CPUs).", "",
              "| backend | prompt tokens | new tokens | TTFT ms | prefill tok/s | decode tok/s | ms/token p50 | p95 |",
              "|---|---|---|---|---|---|---|---|"]
    for b in data["backends"]:
        for x in b["lengths"]:
            tm = x.get("token_ms") or {}
            lines.append(f"| {b['label']} | {x['prompt_tokens']} | {x['new_tokens']} | {_s(x['ttft'], 1, 1000)} | "
                         f"{_s(x['prefill_tps'], 0)} | {_s(x['decode_tps'], 1)} | {_f(tm.get('median'), 2)} | "
                         f"{_f(x['token_ms_p95'], 2)} |")
    lines += [""] + peer_markdown(data) + ([""] if data.get("peer") else [])
    lines += [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"
