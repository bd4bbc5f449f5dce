"""Tests for scripts/commands/console.py: every table is readable at 80 columns and in a log file (no line wider
than the console, nothing elided with '…', every cell's text printed whole)."""
from __future__ import annotations

import io

import pytest
from rich.cells import cell_len
from rich.console import Console

from scripts.commands.console import print_bench, print_check, print_markdown, print_rows, print_serve_check


def render(fn, *args, width=80) -> str:
    out = io.StringIO()
    fn(Console(file=out, width=width, highlight=False), *args)
    return out.getvalue()


def readable(text: str, width: int, *cells: str) -> None:
    lines = text.splitlines()
    assert all(cell_len(ln) <= width for ln in lines), max(lines, key=cell_len)
    assert "…" not in text
    flat = " ".join("".join(ch for ch in text if ch not in "│┃").split())  # a wrapped cell, borders left out
    for cell in cells:
        assert " ".join(str(cell).split()) in flat, cell


WIDE = (["candidate", "8-bit groups (the rest 4-bit)", "size MB (× FP32 ONNX)", "eval acc", "mean KLD", "p99 KLD",
         "top-1", "ΔPPL", "TTFT ms", "decode tok/s", "verdict"],
        [["mixed-head-qkv-up-down8", "lm_head, qkv, up, down", "148.1 (0.227)", "93.4 %", "0.065", "0.44", "88.2 %",
          "+2.4 %", "253", "99", "top-1, accuracy"],
         ["int4-b32-sym", "–", "104.2 (0.159)", "94.7 %", "0.453", "2.22", "70.3 %", "+19.6 %", "258", "132",
          "misses all four"]])


@pytest.mark.parametrize("width", [80, 120, 200])
def test_a_wide_table_becomes_records_when_it_does_not_fit(width):
    text = render(print_rows, "INT4 layouts", *WIDE, width=width)
    readable(text, width, *WIDE[1][0], *WIDE[1][1])
    assert ("┃" in text) == (width == 200), "a table where it fits unwrapped, records otherwise"


def test_a_narrow_table_stays_a_table():
    text = render(print_rows, None, ["backend", "TTFT ms"], [["Foundry Local", "12.5"], ["raw GenAI", "11.0"]])
    assert "┃ backend" in text and "Foundry Local" in text


def test_markdown_tables_print_as_records_and_the_prose_stays():
    md = ("### smollm2: INT4 layouts, measured\n\nSome prose before.\n\n| " + " | ".join(WIDE[0]) + " |\n|"
          + "---|" * len(WIDE[0]) + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in WIDE[1])
          + "\n\n**Winner**: `mixed-o4`.\n")
    text = render(print_markdown, md)
    readable(text, 80, "Some prose before.", "Winner", *WIDE[1][0])
    assert "|" not in text.replace("│", "")


def _summary(median, spread=0.1):
    return {"median": median, "spread": spread}


BENCH = {
    "model_id": "brightwater-qwen-int4:1", "profile": {"name": "quick"},
    "bandwidth": {"gb_per_s": 15.6, "spread": 0.05}, "notes": ["the load average exceeded the CPU count"],
    "backends": [{
        "label": label, "backend": label.split()[0].lower(), "load_seconds": 0.52, "peak_rss_mb": 180.0,
        "fraction_of_bound": 0.4123, "bound_tps": 3000.0, "threads": 2, "bytes_per_token": 2.1e6,
        "load_average": {"before": [1.2, 1.0, 0.9], "after": [1.4, 1.1, 0.9]},
        "lengths": [{"prompt_tokens": 38, "ttft": _summary(0.0052), "prefill_tps": _summary(7300.0),
                     "decode_tps": _summary(1234.5), "token_ms": {"median": 0.81}, "token_ms_p95": 0.95,
                     "cpu_percent": 99.0}],
    } for label in ("Foundry Local (in-process)", "Foundry Local over HTTP", "raw ONNX Runtime GenAI",
                    "PyTorch FP32")],
}


def test_the_bench_table_at_80_columns():
    text = render(print_bench, BENCH)
    readable(text, 80, "Foundry Local over HTTP", "41.23 % of 3000 tok/s", "1.2 → 1.4", "7300 ±5%",
             "the load average exceeded the CPU count")


def test_serve_check_and_check_at_80_columns():
    result = {"model_id": "brightwater-qwen-int4:1", "base_url": "http://127.0.0.1:40123/v1", "questions": 76,
              "max_tokens": 48, "listed": ["brightwater-qwen-int4:1"], "prompt": "Who is the head grower?",
              "answer": "The head grower is Tomas Reyes.", "server": {"stopped_by": "SIGTERM"},
              "columns": [{"name": n, "accuracy_figure": "100.0 % (76/76)", "same_as_in_process": "76/76",
                           "ttft_ms": 17.7, "decode_tps": 812.3, "request_s": 0.052}
                          for n in ("in-process", "HTTP streamed", "HTTP non-streamed, client defaults")]}
    text = render(print_serve_check, result)
    readable(text, 80, "HTTP streamed", "100.0 % (76/76)", "812.3")
    assert "HTTP non-streamed, client" in text and " defaults" in text
    check = {"model_id": "brightwater-qwen-int4:1", "listed": True, "registration": "registered",
             "load_seconds": 1.23, "prompt": "Where is Brightwater Orchard Cooperative located? " * 3,
             "answer": "It is in the Calder Valley, north of the town of Millbrook. " * 3,
             "first_answer_seconds": 0.05, "generate_seconds": 3.2, "accuracy_figure": "100.0 % (76/76)",
             "context": "512 tokens; a default SDK client (2048 output tokens) is refused"}
    readable(render(print_check, check), 80, check["answer"], check["context"])


def test_serve_check_of_a_tools_only_recipe_prints_the_tool_scores_without_an_empty_answer_table():
    cols = [{"name": n, "ttft_ms": None, "decode_tps": None, "request_s": None}
            for n in ("in-process", "HTTP streamed", "HTTP non-streamed, client defaults")]
    result = {"model_id": "brightwater-tools:1", "base_url": "http://127.0.0.1:40123/v1", "questions": 0,
              "max_tokens": 96, "listed": ["brightwater-tools:1"], "server": {"stopped_by": "SIGTERM"},
              "columns": cols, "tools": {"HTTP streaming": {"figure": "calls 22/28 (78.6 %), no call 11/15 (73.3 %)"}}}
    text = render(print_serve_check, result)
    readable(text, 80, "tool cases only", "calls 22/28 (78.6 %)")
    assert "TTFT median ms" not in text and "0 questions" not in text
