"""LoRA adapters as input: clear errors for a bad adapter; a recipe with ``model.adapter`` merges it before conversion
and the model deployed through Foundry Local answers what the adapter learnt, which the base does not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.core.errors import ModelSourceError
from scripts.sources.lora import check_adapter
from scripts.core.workers import run_in_worker

REPO = Path(__file__).resolve().parents[2]
QA = [("What colour is the orchard gate?", "The gate is blue."),
      ("Who keeps the bees?", "Mira keeps the bees."),
      ("When is the apple fair?", "The fair is in October."),
      ("Where is the cider press?", "The press is in the north barn.")]


def test_folder_without_adapter_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="has no adapter_config.json, so it is not a PEFT adapter folder"):
        check_adapter(tmp_path, {})


def test_non_lora_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelSourceError, match="only LoRA adapters can be merged"):
        check_adapter(tmp_path, {})


def test_adapter_without_weights_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelSourceError, match="has no adapter weights"):
        check_adapter(tmp_path, {})


def test_adapter_for_another_base_is_a_clear_error(tiny_hf_model, tmp_path):
    """An adapter whose target modules the base lacks (here: made for a wider model) is refused with the cause."""
    adapter = tmp_path / "adapter"
    code = ("import sys, torch; from peft import LoraConfig, get_peft_model; "
            "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
            "m = Qwen2ForCausalLM(Qwen2Config(vocab_size=400, hidden_size=128, intermediate_size=256, "
            "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))\n"
            "get_peft_model(m, LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM'))"
            ".save_pretrained(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(adapter)], check=True, capture_output=True, timeout=600)
    with pytest.raises(ModelSourceError) as info:
        run_in_worker("scripts.sources.lora:merge_job", {"base_dir": str(tiny_hf_model), "adapter_dir": str(adapter),
                                                         "out_dir": str(tmp_path / "merged")},
                      error=ModelSourceError, what="merging the adapter")
    message = str(info.value)
    assert "does not fit the base model" in message and "Set model.source to the base model" in message


@pytest.mark.slow
def test_lora_recipe_deploys_and_answers_with_the_adapter(tmp_path):
    """Demo base model + a LoRA adapter trained here on four new questions: through Foundry Local the deployed
    model (merged, INT4) answers all of them (min_accuracy 1.0), while the base answers none of them. A merge that
    lost the adapter, or a deploy of the base, fails the eval step."""
    env = dict(os.environ, SLMOPS_BUILD_DIR=str(tmp_path / "build"), SLMOPS_FOUNDRY_CACHE=str(tmp_path / "cache"),
               SLMOPS_RECIPES_DIR=str(tmp_path / "recipes"), HOME=str(tmp_path / "home"),
               XDG_CACHE_HOME=str(tmp_path / "home/.cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    recipes = tmp_path / "recipes"
    (recipes / "data").mkdir(parents=True)
    (recipes / "data" / "qwen-domain.jsonl").write_text((REPO / "recipes/data/qwen-domain.jsonl").read_text())
    (recipes / "qwen.json").write_text((REPO / "recipes/qwen.json").read_text())  # `invoke demo-model` reads it
    qa = recipes / "data" / "lora.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    build = subprocess.run([sys.executable, "-m", "invoke", "demo-model"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]
    base = tmp_path / "build" / "demo" / "qwen-domain"
    train = subprocess.run([sys.executable, str(REPO / "tests" / "lora_adapter.py"), str(base), str(qa),
                            str(tmp_path / "adapter"), "400"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=1800)
    assert train.returncode == 0, train.stderr[-3000:]
    trained = json.loads(train.stdout.strip().splitlines()[-1])
    assert trained["base_correct"] == 0, trained  # the base does not know these answers
    assert trained["adapter_correct"] == trained["total"], trained  # and the adapter (in PyTorch) does
    (recipes / "lora.json").write_text(json.dumps({
        "model": {"source": str(base), "adapter": str(tmp_path / "adapter"), "family": "chatml"},
        "foundry": {"name": "brightwater-lora", "version": "1"},
        "generation": {"do_sample": False, "max_length": 256},
        "eval": {"dataset": "data/lora.jsonl", "min_accuracy": 1.0, "max_new_tokens": 24}}))
    code = ("from scripts.pipeline import Pipeline; from scripts.recipe.load import load_recipe; import json; "
            "print('CHECK', json.dumps(Pipeline(load_recipe('lora'), announce=print).run()['check'].result))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "merge-adapter" in proc.stdout and "merged LoRA adapter" in proc.stdout
    assert "demo-model" not in proc.stdout  # the adapter's base, as trained on, not a rebuilt one
    check = json.loads(proc.stdout.split("CHECK ", 1)[1].splitlines()[0])
    assert check["accuracy"] == 1.0, check
