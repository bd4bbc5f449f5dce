"""Peers in ``invoke bench --peer NAME``: which runs a peer adds to the bench (same prompts, same thread count, same
definitions), the ratio of our build to each, and their table.

Peers register in :data:`PEERS` (the ``--peer`` choices come from it). ``llama.cpp``: GGUF files built from the same
Hugging Face folder the chain converts (:mod:`scripts.peers.gguf_build`: F32, then Q4_0 and Q4_K_M with llama.cpp's
own quantizer), each run by :mod:`scripts.runtimes.llamacpp` in its own worker process with as many threads as the
deployed model's ONNX Runtime intra-op pool (``genai_config.json``; physical cores when it does not say).

Ratios are ours ÷ the peer's, per prompt length: prefill tok/s and decode tok/s (> 1: ours is faster), TTFT
(< 1: ours answers sooner).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scripts.core.errors import PeerError
from scripts.peers import llamacpp
from scripts.peers.gguf_build import build_ggufs, DEFAULT_QUANTS, GGUF_TYPES
from scripts.recipe.runtime import physical_cores

OURS = ("foundry", "genai")
#: How the llama.cpp peer runs, as users run llama.cpp at long context (written beside its figures).
PEER_SETTINGS = ("F16 KV cache (llama.cpp's default), flash attention on (llama.cpp's CLI default `-fa auto` on CPU), "
                 "logical batch 512")  # compared with every peer run: the deployed runtime, and raw GenAI on the same graph


@dataclass(frozen=True)
class PeerRun:
    """One extra bench run: ``backend`` (a registered backend name) on ``path`` with ``options``."""

    key: str  # unique in the bench ("llama.cpp:q4_0")
    backend: str
    label: str
    path: Path
    options: dict[str, Any]


@dataclass(frozen=True)
class Peer:
    """``require()`` returns the installed version or raises :class:`PeerUnavailableError` saying how to install it;
    ``plan(pipeline, context, announce, quants)`` prepares the peer's model files and returns its runs and facts."""

    name: str
    require: Callable[[], str]
    plan: Callable[..., tuple[list[PeerRun], dict]]


def runtime_threads(installed: Path) -> int | None:
    """The deployed model's ONNX Runtime intra-op threads (``genai_config.json``), None when it leaves the default."""
    cfg = Path(installed) / "genai_config.json"
    if not cfg.is_file():
        return None
    doc = json.loads(cfg.read_text(encoding="utf-8"))
    value = ((doc.get("model", {}).get("decoder", {}).get("session_options") or {}).get("intra_op_num_threads"))
    return int(value) if value else None


def peer_threads(installed: Path) -> tuple[int, str]:
    """Threads for a peer, and where the number comes from."""
    ours = runtime_threads(installed)
    if ours:
        return ours, "the deployed model's intra_op_num_threads (genai_config.json)"
    return physical_cores(), "physical cores (the deployed model leaves ONNX Runtime's thread default)"


def plan_llamacpp(pipeline, context: int, announce: Callable[[str], None],
                  quants: tuple[str, ...] | None = None) -> tuple[list[PeerRun], dict]:
    """Build (or reuse) the GGUF files of the recipe's Hugging Face folder; one run per quantization (None: Q4_0 and
    Q4_K_M)."""
    version = llamacpp.require_installed()
    quants = quants or DEFAULT_QUANTS
    hf = Path(pipeline.model_dir).resolve()
    if not (hf / "config.json").is_file():
        raise PeerError(f"The llama.cpp peer converts the Hugging Face folder the chain converts, and {hf} is not one "
                        "(no config.json): run `invoke deploy` first.")
    threads, why = peer_threads(pipeline.installed_dir)
    out = pipeline.paths.root / "peer" / "llama.cpp"
    paths = build_ggufs(hf, out, quants, version, threads, announce=announce)
    options = {"threads": threads, "n_ctx": context, "chat_dir": str(Path(pipeline.installed_dir).resolve()),
               "flash_attn": True}
    runs = [PeerRun(f"llama.cpp:{q}", "llama.cpp", f"llama.cpp {GGUF_TYPES[q].label} (peer)", p, options)
            for q, p in paths.items()]
    info = {"name": llamacpp.NAME, "package": f"{llamacpp.PACKAGE} {version}", "threads": threads,
            "threads_from": why, "hf_dir": str(hf), "settings": PEER_SETTINGS,
            "gguf": {q: {"file": str(p), "bytes": p.stat().st_size} for q, p in paths.items()}}
    return runs, info


PEERS: dict[str, Peer] = {llamacpp.NAME: Peer(llamacpp.NAME, llamacpp.require_installed, plan_llamacpp)}


def get_peer(name: str) -> Peer:
    if name not in PEERS:
        raise PeerError(f"Unknown peer {name!r}; choose one of: {', '.join(PEERS)}.")
    return PEERS[name]


def _median(x: dict, key: str) -> float | None:
    return (x.get(key) or {}).get("median")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def deployed_rows(backends: list[dict]) -> dict[str, dict]:
    """The bench entries that run the deployed model, by backend (not a peer's, not an extra build such as FP32's,
    whose key is not its backend name). Pure."""
    return {b["backend"]: b for b in backends if not b.get("peer") and b.get("key", b["backend"]) == b["backend"]}


def peer_ratios(backends: list[dict]) -> list[dict]:
    """Ours ÷ each peer run, per prompt length (matched by target length). Pure: works on bench JSON entries."""
    by = deployed_rows(backends)
    out = []
    for peer in (b for b in backends if b.get("peer")):
        for ours in (by[k] for k in OURS if k in by):
            targets = {x["target"]: x for x in ours["lengths"]}
            for p in peer["lengths"]:
                o = targets.get(p["target"])
                if o is None:
                    continue
                out.append({"ours": ours["backend"], "ours_label": ours["label"], "peer": peer["key"],
                            "peer_label": peer["label"], "target": p["target"],
                            "prompt_tokens": [o["prompt_tokens"], p["prompt_tokens"]],
                            "prefill": _ratio(_median(o, "prefill_tps"), _median(p, "prefill_tps")),
                            "decode": _ratio(_median(o, "decode_tps"), _median(p, "decode_tps")),
                            "ttft": _ratio(_median(o, "ttft"), _median(p, "ttft"))})
    return out


def _r(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def peer_markdown(data: dict) -> list[str]:
    """The ratio table and the peer's facts (empty without a peer)."""
    peer = data.get("peer")
    if not peer:
        return []
    sizes = ", ".join(f"{k.upper()} {v['bytes'] / 1e6:.1f} MB" for k, v in peer["gguf"].items())
    lines = [f"Peer: {peer['package']}, {peer['threads']} threads ({peer['threads_from']}); "
             + (f"{peer['settings']}; " if peer.get("settings") else "") + "GGUF from "
             f"`{peer['hf_dir']}`: {sizes}. Ratios are ours ÷ the peer's (prefill and decode > 1×: ours is faster; "
             "TTFT < 1×: ours answers sooner).", "",
             "| ours | peer | prompt tokens (ours / peer) | prefill tok/s ratio | decode tok/s ratio | TTFT ratio |",
             "|---|---|---|---|---|---|"]
    for r in peer["ratios"]:
        lines.append(f"| {r['ours_label']} | {r['peer_label']} | {r['prompt_tokens'][0]} / {r['prompt_tokens'][1]} | "
                     f"{_r(r['prefill'])} | {_r(r['decode'])} | {_r(r['ttft'])} |")
    return lines
