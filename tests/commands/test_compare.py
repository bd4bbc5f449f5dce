"""Tests for scripts/commands/compare.py: the pure table/plot/metric helpers, and one real comparison of the tiny model
(Olive builds fp32, int8 and int4; fp16 refused; every build answers through Foundry Local; logits through
ONNX Runtime GenAI and PyTorch). Speed is not asserted (shared machine); only that figures exist."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts.commands.compare_report import (HF_ROW, CompareReport, Row, answer_agreement, markdown_table, perplexity,
                                          svg_plot, token_agreement)


# ----- pure -------------------------------------------------------------------------------------------------------
def test_perplexity_and_agreement():
    a = {"windows": [{"argmax": [1, 2, 3], "nll": [0.0, math.log(2), math.log(4)]}]}
    b = {"windows": [{"argmax": [1, 9, 3], "nll": [0.0, 0.0, 0.0]}]}
    assert perplexity(a) == pytest.approx(2.0)  # exp(mean(0, ln2, ln4)) = exp(ln 2)
    assert token_agreement(a, b) == pytest.approx(2 / 3)
    assert token_agreement(a, a) == 1.0
    assert answer_agreement(["Paris.", "no"], ["paris", "yes"]) == 0.5


def fake_report(quality=True) -> CompareReport:
    def row(p, mb, tps, acc):
        return Row(p, "ok", bytes=int(mb * 1e6), load_seconds=0.5, ttft={"median": 0.1, "spread": 0.1},
                   decode_tps={"median": tps, "spread": 0.2}, peak_rss_mb=300, eval_accuracy=acc,
                   answer_agreement_fp32=acc, token_agreement_fp32=acc, token_agreement_torch=acc, perplexity=1.5)
    rows = [row("fp32", 2000, 8, 1.0), Row("fp16", "refused", "FP16 is for GPU targets: long reason"),
            row("int8", 660, 20, 1.0), row("int4", 400, 30, 0.95), row(HF_ROW, 1984, 5, 1.0)]
    return CompareReport("demo", quality, "" if quality else "quality not measured: random weights", 1984_000_000,
                         rows, {"repeats": 3, "warmup": 1, "lengths": [128], "new_tokens": 32})


def test_markdown_table_is_the_tutorials_table_measured():
    md = markdown_table(fake_report())
    lines = md.splitlines()
    assert lines[0].startswith("| precision | tutorial: size | tutorial: speed / quality | size MB | × FP32 |")
    int4 = next(line for line in lines if line.startswith("| INT4 |"))
    assert "× 0.125" in int4 and "fastest / acceptable" in int4 and "0.200×" in int4 and "95.0 %" in int4
    fp16 = next(line for line in lines if line.startswith("| FP16 |"))
    assert "**refused**: FP16 is for GPU targets (see below)" in fp16 and "× 0.5" in fp16
    assert any(line.startswith("| HF original (PyTorch FP32) |") for line in lines)


def test_tool_scores_split_from_the_eval_answers_and_shown_as_a_column():
    """compare asks the eval questions and the tool set's held-out cases in one job: the first answers score the eval
    set, the rest the tool cases (calls exact, no-call in text), shown as one more column."""
    from scripts.commands.compare import _quality_from
    from scripts.core.evalset import QA
    from scripts.core.tool_evalset import ToolCase
    from scripts.families.tools import format_path, load_format
    fmt = load_format(format_path("chatml"), "chatml")
    cases = [ToolCase([{"role": "user", "content": "hours?"}], [], [("shop_hours", {"day": "monday"})], "call"),
             ToolCase([{"role": "user", "content": "hi"}], [], [], "text")]
    call = '<tool_call>\n{"name": "shop_hours", "arguments": {"day": "monday"}}\n</tool_call>'
    row = Row("int4", "ok")
    _quality_from(row, {"answers": {"answers": [{"text": "In the valley."}, {"text": call}, {"text": call}]}},
                  [QA("Where?", "In the valley.")], cases, fmt)
    assert (row.eval_accuracy, row.tool_calls, row.tool_no_call) == (1.0, 1.0, 0.0)
    report = fake_report()
    report.rows[3].tool_calls, report.rows[3].tool_no_call = row.tool_calls, row.tool_no_call
    int4 = next(line for line in markdown_table(report).splitlines() if line.startswith("| INT4 |"))
    assert int4.endswith("| 100.0 % / 0.0 % |") and "tool calls exact / no call in text" in markdown_table(report)
    assert "tool calls" not in markdown_table(fake_report())
    assert row.tool_results_read is None  # no agent-loop case: no third figure
    loop = ToolCase([{"role": "user", "content": "crates?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "stock", "arguments": "{}"}}]}, {"role": "tool", "content": '{"crates": 42}'}],
        [], [], "loop")
    _quality_from(row, {"answers": {"answers": [{"text": "In the valley."}, {"text": "There are 42 crates."},
                                                {"text": "There are 41."}]}}, [QA("Where?", "In the valley.")],
                  [loop, loop], fmt)
    report.rows[3].tool_results_read = row.tool_results_read
    table = markdown_table(report)
    assert row.tool_results_read == 0.5 and "no call in text / results read" in table
    assert next(line for line in table.splitlines() if line.startswith("| INT4 |")).endswith(" / 50.0 % |")


def test_no_quality_columns_for_random_weights():
    md = markdown_table(fake_report(quality=False))
    assert "eval accuracy" not in md and "perplexity" not in md


def test_json_carries_ratios_and_the_tutorials_claims():
    data = fake_report().to_json()
    int4 = next(r for r in data["rows"] if r["precision"] == "int4")
    assert int4["ratio_fp32"] == pytest.approx(0.2) and int4["tutorial_ratio"] == 0.125
    assert int4["ratio_hf"] == pytest.approx(400 / 1984)


def test_plot_is_an_svg_with_a_point_per_measured_precision():
    svg = svg_plot(fake_report())
    assert svg.startswith("<svg") and svg.count("<circle") == 4  # fp32, int8, int4, HF original; fp16 refused


# ----- real: the tiny model through Olive, GenAI, Foundry Local and PyTorch --------------------------------------
@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_hf_model):
    from scripts.commands.compare import build_precision, run_compare
    from scripts.recipe.load import parse_recipe

    root = tmp_path_factory.mktemp("compare")
    qa = [{"question": "Hello, how are you today?", "answer": "fine"},
          {"question": "What is the capital of France?", "answer": "Paris"}]
    (root / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in qa))
    doc = {"model": {"source": str(tiny_hf_model), "family": "chatml"},
           "conversion": {"precision": "int4", "quantization": {"block_size": 16, "symmetric": False,
                                                                "embeddings": True},
                          "fidelity": {"heldout_tokens": 1024}},
           "foundry": {"name": "tiny-compare"}, "generation": {"max_length": 256},
           "eval": {"dataset": "qa.jsonl", "max_new_tokens": 8, "min_accuracy": 0.0}}
    (root / "tiny.json").write_text(json.dumps(doc))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLMOPS_BUILD_DIR", str(root / "build"))
        mp.setenv("SLMOPS_FOUNDRY_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        recipe = parse_recipe(doc, root / "tiny.json")
        said: list[str] = []
        report = run_compare(recipe, speed=False, announce=said.append)
        again: list[str] = []
        build_precision(recipe, "int8", again.append)
    return {"report": report, "said": said, "again": again, "root": root}


def test_every_cpu_precision_builds_and_answers_through_foundry(compared):
    report = compared["report"]
    for p in ("fp32", "int8", "int4"):
        row = report.row(p)
        assert row.ok, row.reason
        assert len(row.answers) == 2 and row.eval_accuracy is not None  # answered through Foundry Local
        assert row.perplexity and row.perplexity > 1
        assert 0 <= row.token_agreement_fp32 <= 1 and 0 <= row.token_agreement_torch <= 1
    assert report.row("fp32").token_agreement_fp32 == 1.0 and report.row("fp32").kld_mean is None  # the reference
    assert report.row("fp32").token_agreement_torch > 0.9  # the FP32 ONNX build is the PyTorch model
    for p in ("int8", "int4"):  # scored against FP32 ONNX on held-out text (Python's pydoc topics)
        row = report.row(p)
        assert row.kld_mean is not None and 0 <= row.kld_mean <= row.kld_p99 and row.ppl_increase is not None
    assert report.row("int4").kld_mean >= report.row("int8").kld_mean  # fewer bits, further from FP32
    assert report.row(HF_ROW).ok and report.row(HF_ROW).token_agreement_torch == 1.0


def test_fp16_is_refused_up_front(compared):
    row = compared["report"].row("fp16")
    assert row.status == "refused" and "FP16 is for GPU targets" in row.reason
    assert not (compared["root"] / "build" / "tiny" / "precisions" / "fp16").exists()


def test_graphs_carry_what_was_asked_and_sizes_shrink(compared):
    report = compared["report"]
    int8, int4 = report.row("int8"), report.row("int4")
    assert "bits [8]" in int8.graph and "block_size [16]" in int8.graph and "embedding quantized" in int8.graph
    assert "bits [4]" in int4.graph and "block_size [16]" in int4.graph and "zero points [True]" in int4.graph
    assert report.row("fp32").bytes > int8.bytes > int4.bytes


def test_outputs_and_the_smallest_qualifying_precision(compared):
    report = compared["report"]
    for path in report.files.values():
        assert Path(path).is_file()
    md = Path(report.files["markdown"]).read_text()
    assert "| INT4 | × 0.125 |" in md and "Smallest precision that qualifies: **" in md
    assert report.smallest["chosen"] in ("int4", "int8", "fp32") and len(report.smallest["reasons"]) == 4


def test_rerun_reuses_cached_builds(compared):
    assert any("convert: skipped" in line for line in compared["again"])
    assert not any(line.startswith("▶ convert") for line in compared["again"])


# ----- --precision ------------------------------------------------------------------------------------------------
def test_precision_flag_overrides_refuses_fp16_and_rejects_unknown(tmp_path):
    from scripts.core.errors import RecipeError
    from scripts.commands.auto import resolve_auto
    from scripts.recipe.load import parse_recipe, with_precision

    def apply_precision(recipe, name):
        return resolve_auto(with_precision(recipe, name))
    (tmp_path / "hf").mkdir()
    recipe = parse_recipe({"model": {"source": "hf", "family": "chatml"}, "foundry": {"name": "t"}},
                          tmp_path / "r.json")
    assert apply_precision(recipe, "int8").conversion.precision == "int8"
    assert apply_precision(recipe, None).conversion.precision == "int4"
    with pytest.raises(RecipeError, match="--precision fp16: refused. FP16 is for GPU targets"):
        apply_precision(recipe, "fp16")
    with pytest.raises(RecipeError, match="not a precision; choose one of: fp32, fp16, int8, int4, auto"):
        apply_precision(recipe, "int3")
    with pytest.raises(RecipeError, match="set eval.dataset"):
        apply_precision(recipe, "auto")  # no eval set: nothing to compare accuracy on


def test_variant_builds_carry_what_the_recipe_carries_and_never_retrain(tmp_path, tiny_hf_model):
    """A fine-tuning recipe's variant builds (compare's precisions, tune's and auto's layouts, the gate's FP32
    reference) live in their own roots: they use the adapter and the merged folder the main pipeline made, keep the
    adapter as a branch beside the base like the recipe's own build (they converted the merged model instead, so a
    branch or exact layout was never what they measured), and the FP32 reference is the merged model."""
    import shutil
    from types import SimpleNamespace

    from scripts.pipeline import Pipeline, prepared_recipe
    from scripts.recipe.load import parse_recipe

    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    merged, adapter = tmp_path / "build" / "merged", tmp_path / "build" / "adapter"
    shutil.copytree(tiny_hf_model, merged)
    doc = {"model": {"source": str(tiny_hf_model), "family": "chatml", "finetune": {"dataset": "qa.jsonl"}},
           "foundry": {"name": "tiny-ft"}}
    recipe = parse_recipe(doc, tmp_path / "ft.json")
    main = SimpleNamespace(model_dir=merged, base_dir=Path(tiny_hf_model), adapter_dir=adapter)
    variant = prepared_recipe(recipe, main)
    assert variant.finetune.dataset is None and variant.adapter == str(adapter) and variant.prepared == str(merged)
    assert (variant.name, variant.conversion, variant.foundry) == (recipe.name, recipe.conversion, recipe.foundry)
    build = Pipeline.variant(variant, variant.conversion, "precisions/int4")
    assert build.model_dir == merged and build.convert_dir == Path(tiny_hf_model) and build.carried.adapter == adapter
    assert not {"finetune", "merge-adapter"} & set(build.model_steps())
    reference = Pipeline.variant(variant, variant.conversion.reference(), "precisions/fp32")
    assert reference.convert_dir == merged and reference.carried.adapter is None
    plain = parse_recipe({**doc, "model": {"source": str(tiny_hf_model), "family": "chatml"}}, tmp_path / "p.json")
    assert prepared_recipe(plain, SimpleNamespace(adapter_dir=None)) is plain
