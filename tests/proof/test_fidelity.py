"""Tests for scripts/proof/fidelity.py: KL divergence, top-1 agreement and perplexity against FP32, pure and through
ONNX Runtime GenAI on a real (tiny) converted graph: an identical model scores KLD 0 and top-1 100 %, a perturbed
one scores worse."""
from __future__ import annotations

import math
import numpy as np
import pytest

from scripts.core.english_text import calibration_text, heldout_text
from scripts.proof.fidelity import compare_window, failures, log_softmax, summarise, token_windows
from scripts.proof.measure import run_worker
from scripts.recipe.spec import FidelitySpec


def test_heldout_text_is_real_english_and_long_enough():
    text = heldout_text()
    assert len(text) > 300_000 and "the" in text.split()[:2000]
    assert text == heldout_text()  # same order every time


def test_calibration_reads_the_tail_the_gate_never_scores():
    text, tail = heldout_text(), calibration_text()
    assert text.endswith(tail) and len(tail) < len(text) // 4
    # the gate scores at most its largest default of tokens from the head: ~4 characters a token at most
    assert text.find(tail) > 4 * 10240 * 4


def test_token_windows():
    assert token_windows(range(10), 4, 9) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(range(3), 4, 100) == []


def test_identical_distributions_score_zero_kld_full_agreement_and_equal_perplexity():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 11))
    ids = [1, 2, 3, 4, 5, 6]
    window = compare_window(logits, logits, ids)
    f = summarise([window])
    assert f.tokens == 5 and f.kld_mean == pytest.approx(0, abs=1e-12) and f.top1 == 1.0
    assert f.perplexity == pytest.approx(f.perplexity_reference) and f.ppl_increase == pytest.approx(0)
    expected_nll = -log_softmax(logits)[np.arange(5), ids[1:]]
    assert f.perplexity == pytest.approx(math.exp(expected_nll.mean()))


def test_a_perturbed_distribution_scores_worse():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 50)) * 3
    ids = list(rng.integers(0, 50, size=40))
    near = summarise([compare_window(ref + rng.normal(size=ref.shape) * 0.1, ref, ids)])
    far = summarise([compare_window(ref + rng.normal(size=ref.shape) * 2.0, ref, ids)])
    assert 0 < near.kld_mean < far.kld_mean and near.kld_p99 < far.kld_p99
    assert far.top1 < near.top1 <= 1.0
    spec = FidelitySpec(max_kld=near.kld_mean * 2, min_top1=0.9, max_ppl_increase=1.0)
    assert failures(near.to_json(), spec) == [] or near.top1 < 0.9
    missed = failures(far.to_json(), spec)
    assert missed and missed[0].startswith("mean KLD")


def test_fidelity_through_genai_on_converted_graphs(tiny_onnx_model, perturbed_onnx):
    windows = [list(range(5, 70)), list(range(70, 135))]
    same = run_worker("genai", tiny_onnx_model, [{"kind": "fidelity", "windows": windows,
                                                  "reference_dir": str(tiny_onnx_model)}])["jobs"][0]
    assert same["tokens"] == 128 and same["kld_mean"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0
    assert same["ppl_increase"] == pytest.approx(0, abs=1e-9)
    other = run_worker("genai", perturbed_onnx, [{"kind": "fidelity", "windows": windows,
                                                  "reference_dir": str(tiny_onnx_model)}])["jobs"][0]
    assert other["kld_mean"] > 1e-4 and other["kld_p99"] >= other["kld_mean"]
    assert other["top1"] < 1.0 or other["kld_mean"] > 1e-3
