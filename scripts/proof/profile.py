"""``invoke profile``: where the time of one generation goes inside ONNX Runtime, per operator type, for the
installed model through raw ONNX Runtime GenAI (the graph Foundry Local runs).

The installed folder is mirrored (weights hard-linked) with ``enable_profiling`` added to
``model.decoder.session_options`` (ONNX Runtime's session profiler: one JSON trace for the session's life). A worker
loads it, appends a prompt of about ``prompt_tokens`` tokens (the bench's filler text and chat template) and generates
``new_tokens`` tokens greedily. In the trace, the first ``model_run`` is the prefill (the whole prompt in one run),
the later ones are decode steps; every ``*_kernel_time`` event is one operator's execution, attributed to the run
whose time window holds it. The tables: per operator type, total milliseconds, share of the run's operator time,
number of nodes executed, for prefill and for decode (per step).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scripts.convert.package import mirror_with_config, with_session_options
from scripts.core.errors import MeasurementError
from scripts.proof.measure import length_prompts
from scripts.runtimes.backends import render_chat
from scripts.core.workers import run_in_worker

PREFIX = "ort-profile"


def mirror_with_profiling(installed: Path, out: Path, prefix: Path) -> Path:
    """``installed`` re-created at ``out`` (hard links) with ``enable_profiling`` = ``prefix`` in its session options."""
    return mirror_with_config(installed, out, lambda doc: with_session_options(doc, {"enable_profiling": str(prefix)}))


def profile_job(request: dict) -> dict:
    """Worker: one profiled generation; returns the trace file and the wall-clock times of prefill and decode."""
    import onnxruntime_genai as og
    model_dir = Path(request["model_dir"])
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(render_chat(model_dir, request["messages"]))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + request["new_tokens"])
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done() and steps < request["new_tokens"] - 1:
        gen.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    del gen, params, tokenizer, model  # the session writes its trace when it ends
    traces = sorted(Path(request["prefix"]).parent.glob(Path(request["prefix"]).name + "*.json"))
    if not traces:
        raise MeasurementError(f"ONNX Runtime wrote no profile for the prefix {request['prefix']}.")
    return {"trace": str(traces[-1]), "prompt_tokens": len(ids), "decode_steps": steps,
            "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1}


def runs_and_kernels(events: list[dict]) -> tuple[list[tuple[int, int]], list[dict]]:
    """The ``model_run`` windows ``(start, end)`` in µs, in order, and the operator kernel events. Pure."""
    runs = sorted((int(e["ts"]), int(e["ts"]) + int(e["dur"])) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    kernels = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    return runs, kernels


def op_table(kernels: list[dict], per: int = 1) -> list[dict]:
    """Per operator type: total ms (÷ ``per`` runs), share of the operator time, nodes executed (÷ ``per``). Pure."""
    by: dict[str, list[float]] = {}
    for k in kernels:
        by.setdefault((k.get("args") or {}).get("op_name", "?"), []).append(float(k["dur"]))
    total = sum(sum(v) for v in by.values()) or 1.0
    rows = [{"op": op, "ms": sum(d) / 1000 / per, "share": sum(d) / total, "nodes": len(d) / per}
            for op, d in by.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def summarise_trace(events: list[dict]) -> dict:
    """Prefill (first run) and decode (later runs, per step) operator tables, and run times. Pure."""
    runs, kernels = runs_and_kernels(events)
    if not runs:
        raise MeasurementError("The profile has no model_run event: nothing was run while profiling.")

    def inside(window: tuple[int, int]) -> list[dict]:
        return [k for k in kernels if window[0] <= int(k["ts"]) <= window[1]]

    decode_kernels = [k for w in runs[1:] for k in inside(w)]
    return {"runs": len(runs), "prefill_ms": (runs[0][1] - runs[0][0]) / 1000,
            "decode_ms_per_step": (sum(e - s for s, e in runs[1:]) / 1000 / len(runs[1:])) if runs[1:] else None,
            "prefill": op_table(inside(runs[0])), "decode": op_table(decode_kernels, max(1, len(runs) - 1))}


def run_profile(installed: Path, work: Path, prompt_tokens: int, new_tokens: int) -> dict:
    """Profile one generation of the installed model; return plain JSON data (trace path, tables)."""
    installed = Path(installed)
    prefix = Path(work).resolve() / "trace" / PREFIX
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for old in prefix.parent.glob(PREFIX + "*.json"):
        old.unlink()
    folder = mirror_with_profiling(installed, Path(work) / "model", prefix)
    (target, messages), = length_prompts(installed, [prompt_tokens])
    load_before = os.getloadavg()[0]
    result = run_in_worker("scripts.proof.profile:profile_job",
                           {"model_dir": str(folder.resolve()), "messages": messages, "new_tokens": new_tokens,
                            "prefix": str(prefix)}, error=MeasurementError,
                           what=f"profiling {installed} with ONNX Runtime's profiler")
    events = json.loads(Path(result["trace"]).read_text(encoding="utf-8"))
    config = json.loads((installed / "genai_config.json").read_text(encoding="utf-8"))
    threads = (config["model"]["decoder"].get("session_options") or {}).get("intra_op_num_threads")
    return {"model_dir": str(installed), "target_prompt_tokens": target, "threads": threads, **result,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
            **summarise_trace(events)}


def profile_markdown(data: dict, top: int = 12) -> str:
    def table(rows: list[dict], unit: str) -> list[str]:
        out = [f"| op type | ms{unit} | share of op time | nodes{unit} |", "|---|---|---|---|"]
        out += [f"| {r['op']} | {r['ms']:.2f} | {100 * r['share']:.1f} % | {r['nodes']:g} |" for r in rows[:top]]
        return out
    decode = data.get("decode_ms_per_step")
    lines = [f"# ONNX Runtime profile: {data['model_dir']}", "",
             f"One greedy generation through raw ONNX Runtime GenAI: {data['prompt_tokens']}-token prompt, "
             f"{data['decode_steps']} decode steps, intra_op_num_threads {data['threads'] or 'default'}. Profiler: "
             f"prefill run {data['prefill_ms']:.1f} ms"
             + (f", decode {decode:.2f} ms per step" if decode else "")
             + f" (wall clock with the profiler on: prefill {1000 * data['prefill_seconds']:.1f} ms); 1-minute load "
             f"average {data['load_average'][0]:.1f} → {data['load_average'][1]:.1f} on {data['cpus']} CPUs. Trace: "
             f"`{data['trace']}` (open it in chrome://tracing or Perfetto).", "",
             f"## Prefill ({data['prompt_tokens']} tokens in one run)", ""] + table(data["prefill"], "")
    if data["decode"]:
        lines += ["", "## Decode (per step)", ""] + table(data["decode"], " / step")
    return "\n".join(lines) + "\n"
