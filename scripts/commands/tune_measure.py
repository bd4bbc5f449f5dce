"""What `invoke tune` measures per candidate, in worker processes: through Foundry Local the eval answers and the speed
at a 128-token prompt (:data:`TUNE_PROFILE`), through ONNX Runtime GenAI the fidelity to the FP32 ONNX build; and the
run-off that measures the qualifying candidates' speed again, interleaved. Kept apart from the judgement and the table
(:mod:`scripts.commands.tune`) because the cached measurements are keyed on this code: editing how candidates are judged or
shown does not measure them again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from scripts.proof.bench import pool_rounds
from scripts.proof.measure import bench_request, Profile, run_worker, to_backend_bench, weights_size

TUNE_PROFILE = Profile("tune", lengths=(128,), max_prompt_tokens=128, new_tokens=64, warmup=1, repeats=3)
#: Rounds of the run-off among qualifying candidates (each measured once per round, interleaved, runs pooled).
RUNOFF_ROUNDS = 3


def measure_candidate(folder: Path, fp32_folder: Path, chats: list, heldout: list, max_new_tokens: int,
                      context: int) -> dict[str, Any]:
    """Foundry Local (answers, speed) and ONNX Runtime GenAI (fidelity to FP32) on one built package."""
    jobs = [bench_request(folder, TUNE_PROFILE, context)]
    if chats:
        jobs.append({"kind": "answers", "conversations": chats, "max_new_tokens": max_new_tokens})
    result = run_worker("foundry", folder, jobs)
    out: dict[str, Any] = {**_speed(folder, result), "bytes": weights_size(folder)}
    answers = next((j for j in result["jobs"] if j["kind"] == "answers"), None)
    out["answers"] = [a["text"] for a in answers["answers"]] if answers else None
    if heldout and Path(folder).resolve() != Path(fp32_folder).resolve():
        job = {"kind": "fidelity", "windows": heldout, "reference_dir": str(fp32_folder)}
        out["fidelity"] = run_worker("genai", folder, [job])["jobs"][0]
    return out


def runoff(finalists: Sequence[tuple[str, Path]], context: int, rounds: int = RUNOFF_ROUNDS) -> dict[str, dict]:
    """The speed of the qualifying candidates measured again through Foundry Local, interleaved — each once per round,
    so a change of load on a shared machine hits them alike — every timed run of every round pooled:
    ``{name: {"ttft_ms", "decode_tps", "runs"}}``."""
    raw: dict[str, list[dict]] = {name: [] for name, _ in finalists}
    for _ in range(rounds):
        for name, folder in finalists:
            raw[name].append(run_worker("foundry", folder, [bench_request(folder, TUNE_PROFILE, context)]))
    return {name: {**_speed(folder, pool_rounds(raw[name])), "runs": rounds * TUNE_PROFILE.repeats}
            for name, folder in finalists}


def _speed(folder: Path, result: dict) -> dict[str, float | None]:
    """Median TTFT (ms) and decode tok/s of a worker's bench job (pure)."""
    first = to_backend_bench("foundry", folder, result).lengths[0]
    return {"ttft_ms": first.ttft.median * 1000 if first.ttft else None,
            "decode_tps": first.decode_tps.median if first.decode_tps else None}
