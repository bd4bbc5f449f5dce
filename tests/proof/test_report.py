"""Report: markdown + self-contained HTML with embedded plots, from saved bench/validate results."""
import base64
import json

from scripts.proof.bench import bench_markdown
from scripts.proof.validate import validate_markdown
from scripts.proof.report import compare_rows, write_report


def _summary(m):
    return {"n": 3, "median": m, "p25": m * 0.9, "p75": m * 1.1, "min": m * 0.8, "max": m * 1.2, "spread": 0.2}


def _length(prompt, tps):
    return {"target": prompt, "prompt_tokens": prompt, "new_tokens": 32, "ttft": _summary(0.01 * prompt / 32),
            "prefill_tps": _summary(prompt * 50.0), "decode_tps": _summary(tps), "token_ms": _summary(1000 / tps),
            "token_ms_p95": 1200 / tps, "cpu_percent": 180.0}


BENCH = {"recipe": "qwen", "model_id": "m:1", "context": 512, "notes": ["2 shared cores."],
         "profile": {"name": "quick", "lengths": [32], "max_prompt_tokens": 512, "new_tokens": 32, "warmup": 1,
                     "repeats": 3},
         "machine": {"cpus": 2}, "bandwidth": {"gb_per_s": 15.0, "spread": 0.1, "repeats": 7, "buffer_mb": 256,
                                               "method": "numpy sum"},
         "backends": [{"backend": b, "label": b, "model_dir": "/x", "size_bytes": 10 ** 6, "load_seconds": 0.1,
                       "rss_before_load_mb": 50.0, "peak_rss_mb": 90.0, "cpu_count": 2,
                       "lengths": [_length(38, tps), _length(464, tps / 2)], "bytes_per_token": 900_000,
                       "bound_tps": 16666.0, "fraction_of_bound": tps / 16666.0}
                      for b, tps in (("foundry", 900.0), ("genai", 1000.0), ("torch", 25.0))]}
VALIDATE = {"model_id": "m:1", "profile": "quick", "passed": False,
            "items": [{"key": "domain", "title": "domain answers", "status": "fail", "figure": "accuracy 0.0 % (0/2)",
                       "detail": {}},
                      {"key": "leaks", "title": "no memory leaks", "status": "pass", "figure": "growth +0.1 MB",
                       "detail": {"warmup": 30}},
                      {"key": "edge", "title": "edge cases", "status": "pass", "figure": "9/9",
                       "detail": {"cases": [{"name": "empty prompt", "passed": True, "outcome": "error: nothing"}]}}],
            "raw": {"soak": {"rss": [90_000_000 + 1000 * i for i in range(300)]}}}


def test_markdown_tables():
    md = bench_markdown(BENCH)
    assert "| foundry |" in md and "decode / bound" in md and "15.0 GB/s" in md
    assert "| torch | 464 |" in md
    v = validate_markdown(VALIDATE)
    assert "FAIL" in v.splitlines()[0] and "| empty prompt | PASS |" in v


def test_report_html_is_self_contained_with_plots(tmp_path):
    proof, stamps = tmp_path / "proof", tmp_path / "stamps"
    proof.mkdir()
    stamps.mkdir()
    (proof / "bench.json").write_text(json.dumps(BENCH))
    (proof / "validate.json").write_text(json.dumps(VALIDATE))
    (stamps / "compare.json").write_text(json.dumps({"result": {"rows": [{"precision": "int4", "size_mb": 1.5}]}}))
    md, html = write_report(proof, "qwen", stamps)
    text = html.read_text()
    assert text.count("data:image/png;base64,") == 3 and "src='latency.png'" not in text
    png = base64.b64decode(text.split("data:image/png;base64,")[1].split("'")[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<td class='fail'>FAIL</td>" in text and "Precisions" in text and "int4" in text
    assert "![Latency vs prompt length](latency.png)" in md.read_text() and (proof / "latency.png").is_file()


def test_report_without_results_says_what_to_run(tmp_path):
    md, html = write_report(tmp_path, "qwen")
    assert "invoke validate --model qwen" in md.read_text() and "invoke bench --model qwen" in html.read_text()


def test_compare_rows_shapes():
    assert compare_rows([{"a": 1}]) == [{"a": 1}]
    assert compare_rows({"rows": [{"a": 1}]}) == [{"a": 1}]
    assert compare_rows(None) == [] and compare_rows({"x": 1}) == []
