"""The proof of a deployment: bench and validate results saved under ``build/<recipe>/proof/``, the report
written from them, and the two as Make-style steps for ``deploy`` (skipped when the installed model, the
recipe's thresholds, the profile and the measuring code are unchanged)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from scripts.core.errors import QualityError
from scripts.core.fileops import write_json_atomic, write_text_atomic
from scripts.proof.bench import bench_markdown, run_bench
from scripts.proof.measure import context_limit
from scripts.proof.peer_bench import get_peer, PeerRun
from scripts.proof.profile import profile_markdown, run_profile
from scripts.proof.report import write_report as write_report_files
from scripts.proof.threads_ab import run_threads_ab, threads_markdown
from scripts.proof.validate import run_validate, validate_markdown
from scripts.core.steps import Step

log = logging.getLogger(__name__)


def proof_dir(pipeline) -> Path:
    return pipeline.paths.root / "proof"


def bench_and_save(pipeline, profile, status: Callable[[str], Any] = lambda s: None, peer: str | None = None,
                   extra: Sequence[Callable[[Any, Callable[[str], Any]], PeerRun]] = (), rounds: int = 1) -> dict:
    """``invoke bench``; ``extra``: makers of further runs, each called with the pipeline and ``status`` (e.g.
    :func:`scripts.commands.compare.fp32_bench_run`)."""
    data = run_bench(pipeline, profile, status, peer, [make(pipeline, status) for make in extra], rounds)
    write_json_atomic(proof_dir(pipeline) / "bench.json", data)
    write_text_atomic(proof_dir(pipeline) / "bench.md", bench_markdown(data))
    return data


def validate_and_save(pipeline, profile, status: Callable[[str], Any] = lambda s: None):
    report = run_validate(pipeline, profile, status)
    data = report.to_json()
    write_json_atomic(proof_dir(pipeline) / "validate.json", data)
    write_text_atomic(proof_dir(pipeline) / "validate.md", validate_markdown(data))
    return report


def failure_message(report) -> str:
    bad = [i for i in report.items if i.failed]
    lines = "\n".join(f"  - {i.title}: {i.figure}" for i in bad)
    return (f"{report.model_id} failed {len(bad)} validation item(s):\n{lines}\nThresholds are the recipe's "
            "`validate` and `eval` keys; details in build/<recipe>/proof/validate.md.")


def write_report(pipeline) -> tuple[Path, Path]:
    return write_report_files(proof_dir(pipeline), pipeline.recipe.name, pipeline.paths.stamps)


def proof_steps(pipeline, profile, status: Callable[[str], Any] = lambda s: None) -> list:
    """``bench`` and ``validate`` as steps of the deploy chain."""
    r = pipeline.recipe
    hashed = r.settings_for_hash()
    inputs = [pipeline.installed_dir] + ([Path(pipeline.model_dir)] if Path(pipeline.model_dir).is_dir() else [])

    def validate_body() -> dict:
        report = validate_and_save(pipeline, profile, status)
        summary = {"passed": report.passed, "items": [{"key": i.key, "status": i.status, "figure": i.figure}
                                                      for i in report.items]}
        if not report.passed:
            raise QualityError(failure_message(report))
        return summary

    def bench_body() -> dict:
        data = bench_and_save(pipeline, profile, status)
        return {"backends": [{"backend": b["backend"], "decode_tps": b["lengths"][0]["decode_tps"]["median"]
                              if b["lengths"] and b["lengths"][0]["decode_tps"] else None,
                              "fraction_of_bound": b["fraction_of_bound"]} for b in data["backends"]]}

    settings = {"profile": profile.to_json(), "model_id": pipeline.model_id, "cache": str(pipeline.cache_root)}
    out = proof_dir(pipeline)
    return [
        Step("bench", bench_body, inputs=inputs, settings=settings, outputs=[out / "bench.json"],
             code=["scripts.proof.bench"]),
        Step("validate", validate_body, inputs=inputs + ([r.eval.dataset] if r.eval.dataset else []),
             settings={**settings, **{k: hashed[k] for k in ("eval", "validate")}},
             outputs=[out / "validate.json"], code=["scripts.proof.validate"]),
    ]


def run_proof(pipeline, profile, status: Callable[[str], Any] = lambda s: None) -> dict:
    """Bench, validate, then write the report (also when validation fails, before re-raising)."""
    outcomes = {}
    try:
        for step in proof_steps(pipeline, profile, status):
            outcomes[step.name] = pipeline.runner.run(step)
    finally:
        if (proof_dir(pipeline) / "bench.json").is_file() or (proof_dir(pipeline) / "validate.json").is_file():
            md, html = write_report(pipeline)
            pipeline.announce(f"       report: {html}")
    return {"validate": outcomes["validate"].result, "bench": outcomes["bench"].result,
            "report": str(html), "ran": [n for n, o in outcomes.items() if not o.skipped],
            "skipped": [n for n, o in outcomes.items() if o.skipped]}


def threads_ab_and_save(pipeline, profile, variants, rounds: int, backends, status: Callable[[str], Any] = lambda s: None,
                        peer: str | None = None) -> dict:
    """``invoke bench-threads``: :func:`scripts.proof.threads_ab.run_threads_ab` on the installed model (with ``peer``'s
    runs at each thread count), saved as ``proof/threads.{json,md}``."""
    runs: list = []
    if peer:
        chosen = get_peer(peer)
        chosen.require()
        runs, _ = chosen.plan(pipeline, context_limit(pipeline.installed_dir), status)
    data = run_threads_ab(pipeline.installed_dir, pipeline.paths.root / "threads-ab", variants, profile, rounds,
                          backends, status, runs)
    write_json_atomic(proof_dir(pipeline) / "threads.json", data)
    write_text_atomic(proof_dir(pipeline) / "threads.md", threads_markdown(data))
    return data


def profile_and_save(pipeline, prompt_tokens: int, new_tokens: int) -> dict:
    """``invoke profile``: :func:`scripts.proof.profile.run_profile` on the installed model, saved as
    ``proof/profile.{json,md}`` (the trace stays in ``build/<recipe>/profile/trace/``)."""
    data = run_profile(pipeline.installed_dir, pipeline.paths.root / "profile", prompt_tokens, new_tokens)
    write_json_atomic(proof_dir(pipeline) / "profile.json", data)
    write_text_atomic(proof_dir(pipeline) / "profile.md", profile_markdown(data))
    return data
