"""Issue 21, installs you can trust and take back, with the real tools (Olive once, the Foundry Local runtime) in
temporary build, cache and recipe folders, through `invoke` processes:

- a deploy verifies the installed folder against its manifest before trusting the install stamp: a cut weight file
  or another recipe's build in place is reinstalled, and says why; `check` on a damaged install names the file and
  the repairing command; two recipes with one ``foundry.publisher/name`` are refused naming both (``--take-over``);
- every changed package is the next version (``name:N``), earlier ones stay kept and listed (`invoke models`), and
  `invoke rollback` makes one current: the eval set is then answered exactly as that version answered it;
- a rollback SIGKILLed at every point (``SLMOPS_TEST_KILL_AT``, also without RENAME_EXCHANGE) leaves exactly one
  current version, which the next command recovers, loads and answers with.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.convert.install import list_cache
from scripts.convert.versions import MANIFEST, read_manifest, versions_root
from scripts.core.faults import KILL_ENV, NO_EXCHANGE_ENV
from tests.sandbox import invoke, make_sandbox, REPO

KILLED = -9
LEFTOVER = re.compile(r"^\..+\.(staging|old)-[0-9a-f]{8}$")
QUESTIONS = ["Hello", "What is the capital of France?", "Foundry Local runs small language models"]


def recipe(model_dir: Path, name: str = "tiny-ver", max_length: int = 256, **foundry) -> dict:
    return {"model": {"source": str(model_dir), "family": "auto"},
            "foundry": {"publisher": "rel", "name": name, **foundry},
            "generation": {"max_length": max_length, "do_sample": False},  # greedy: answers comparable across runs
            "eval": {"dataset": "qa.jsonl", "min_accuracy": 0.0, "max_new_tokens": 8},
            # random weights: the fidelity gate's figures are noise here (docs/fidelity.md); these tests are about versions
            "conversion": {"fidelity": {"gate": False}}}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_hf_model):
    box = make_sandbox(tmp_path_factory.mktemp("versions"), "rel/tiny-ver", tiny_hf_model)
    (box["recipes"] / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n"
                                                     for q in QUESTIONS))
    (box["recipes"] / "tiny.json").write_text(json.dumps(recipe(tiny_hf_model)))
    return box


def flat(proc: subprocess.CompletedProcess) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def set_max_length(sandbox, value: int) -> None:
    (sandbox["recipes"] / "tiny.json").write_text(json.dumps(recipe(sandbox["hf"], max_length=value)))


def current(sandbox) -> int | None:
    return (read_manifest(sandbox["installed"]) or {}).get("version")


def kept(sandbox) -> list[int]:
    root = versions_root(sandbox["cache"], "rel", "tiny-ver")
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def model_lines(sandbox) -> list[str]:
    proc = invoke(sandbox, "models")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(len(line) <= 80 for line in proc.stdout.splitlines()), proc.stdout
    return [line for line in proc.stdout.splitlines() if "rel/tiny-ver:" in line]


ANSWERS = r"""
import json, sys
from scripts.pipeline import Pipeline
from scripts.recipe.load import load_recipe
result = Pipeline(load_recipe("tiny")).check()
print("RESULT", json.dumps({"model_id": result["model_id"], "answers": [w["got"] for w in result["wrong"]]}))
"""


def answers(sandbox) -> dict:
    """The eval set answered through Foundry Local by the current version (every answer: the model is random)."""
    proc = subprocess.run([sys.executable, "-c", ANSWERS], cwd=REPO, env=sandbox["env"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


def deploy(sandbox, *extra, ok=True) -> subprocess.CompletedProcess:
    proc = invoke(sandbox, "deploy", "--model", "tiny", "--skip-proof", *extra)
    no_traceback(proc)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def deployed(sandbox):
    first = deploy(sandbox)
    assert current(sandbox) == 1 and kept(sandbox) == [1]
    return {"v1": answers(sandbox), "first": first}


# ----- a deploy trusts the cache, not its stamp ------------------------------------------------------------------------
def test_an_unchanged_deploy_skips_install_after_checking_the_installed_files(sandbox, deployed):
    proc = deploy(sandbox)
    assert "• install: skipped (inputs unchanged)" in proc.stdout
    assert current(sandbox) == 1


def test_a_cut_weight_file_fails_check_naming_it_and_the_next_deploy_reinstalls(sandbox, deployed):
    data = sandbox["installed"] / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as fh:
        fh.truncate(min(1 << 20, size // 2))
    check = invoke(sandbox, "check", "--model", "tiny")
    no_traceback(check)
    assert check.returncode == 1
    message = flat(check)
    assert f"{data} is {min(1 << 20, size // 2):,} bytes; the install wrote {size:,}" in message
    assert "Repair it with `invoke deploy --model tiny`" in message
    for command in (["serve", "--model", "tiny", "--port", "0"], ["run", "--model", "tiny"]):
        refused = invoke(sandbox, *command)
        no_traceback(refused)
        assert refused.returncode == 1 and f"{data} is {min(1 << 20, size // 2):,} bytes" in flat(refused), command

    proc = deploy(sandbox)
    out = " ".join(proc.stdout.split())
    assert "▶ install (inputs unchanged, but the installed model is damaged (" in out and "model.onnx.data is" in out
    assert data.stat().st_size == size and current(sandbox) == 1, "the same content keeps its version"
    assert invoke(sandbox, "check", "--model", "tiny").returncode == 0


def test_the_same_size_but_other_bytes_are_found_by_the_hash(sandbox, deployed):
    """The fast path trusts sizes and mtimes; a file rewritten in place (new mtime) is hashed and found."""
    config = sandbox["installed"] / "genai_config.json"
    text = config.read_text()
    assert '"do_sample": false' in text
    config.write_text(text.replace('"do_sample": false', '"do_sample": true '))  # same size, other bytes
    assert config.stat().st_size == len(text.encode())
    proc = deploy(sandbox)
    assert "▶ install (inputs unchanged, but the installed model is damaged (" in " ".join(proc.stdout.split())
    assert config.read_text() == text


def other_recipe(sandbox) -> None:
    (sandbox["recipes"] / "other.json").write_text(json.dumps(
        {**recipe(sandbox["hf"], max_length=128), "conversion": {"precision": "fp32"}}))


def test_a_second_recipe_with_the_same_foundry_name_is_refused_naming_both(sandbox, deployed):
    other_recipe(sandbox)
    proc = invoke(sandbox, "deploy", "--model", "other", "--skip-proof")
    no_traceback(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = flat(proc)
    assert (f"installed by recipe 'tiny' ({sandbox['recipes'] / 'tiny.json'}); recipe 'other' "
            f"({sandbox['recipes'] / 'other.json'}) installs to the same foundry.publisher/foundry.name") in message
    assert "--take-over" in message
    assert current(sandbox) == 1 and (read_manifest(sandbox["installed"])["recipe"]["name"]) == "tiny"


def test_another_build_in_place_is_not_trusted_by_a_plain_deploy(sandbox, deployed):
    """The tester's case: another recipe's FP32 build installed over ours; our plain deploy no longer skips."""
    other_recipe(sandbox)
    taken = invoke(sandbox, "deploy", "--model", "other", "--skip-proof", "--take-over")
    no_traceback(taken)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    assert read_manifest(sandbox["installed"])["recipe"]["name"] == "other" and current(sandbox) == 2
    refused = deploy(sandbox, ok=False)
    assert refused.returncode == 1
    out = flat(refused)
    assert "• install: skipped" not in out and "▶ convert" not in out, "refused before any step"
    assert "holds tiny-ver:2 installed by recipe 'other'" in out and "--take-over" in out
    back = deploy(sandbox, "--take-over")
    assert "▶ install" in back.stdout and current(sandbox) == 1, "our content is kept version 1 again"
    assert read_manifest(sandbox["installed"])["recipe"]["name"] == "tiny"
    (sandbox["recipes"] / "other.json").unlink()


# ----- versions and rollback ---------------------------------------------------------------------------------------------
def test_a_changed_package_is_the_next_version_and_the_previous_stays_listed(sandbox, deployed):
    set_max_length(sandbox, 200)
    proc = deploy(sandbox)
    assert "installed rel/tiny-ver:3" in proc.stdout  # 2 was the other recipe's build
    assert current(sandbox) == 3 and kept(sandbox) == [1, 2, 3]
    lines = model_lines(sandbox)
    assert [line.split()[0] for line in lines if line.startswith("*")] == ["*"]
    assert any(line.startswith("* rel/tiny-ver:3") for line in lines)
    assert any(line.startswith("  rel/tiny-ver:1") and " tiny " in line for line in lines)
    assert [m["name"] for m in list_cache(sandbox["cache"])] == ["tiny-ver"], "kept versions are hidden from the scanner"


def test_rollback_answers_the_previous_eval_set_identically(sandbox, deployed):
    v3 = answers(sandbox)
    assert v3["model_id"] == "tiny-ver:3"
    proc = invoke(sandbox, "rollback", "--model", "tiny", "--to", "1")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rel/tiny-ver:1" in proc.stdout and current(sandbox) == 1
    v1 = answers(sandbox)
    assert v1 == deployed["v1"], "version 1 again, answered exactly as before"
    check = invoke(sandbox, "check", "--model", "tiny")
    assert check.returncode == 0 and "tiny-ver:1" in check.stdout


def test_a_redeploy_after_a_rollback_brings_the_recipes_version_back_under_its_number(sandbox, deployed):
    proc = deploy(sandbox)
    assert "is current after `invoke rollback`: installing this recipe's build again" in " ".join(proc.stdout.split())
    assert current(sandbox) == 3 and kept(sandbox) == [1, 2, 3]


def test_rollback_with_nothing_to_go_to_names_the_kept_versions(sandbox, deployed):
    proc = invoke(sandbox, "rollback", "--model", "tiny", "--to", "9")
    no_traceback(proc)
    assert proc.returncode == 1 and "has no kept version 9; kept versions: 1, 2, 3 (current)" in flat(proc)
    bad = invoke(sandbox, "rollback", "--model", "tiny", "--to", "x")
    no_traceback(bad)
    assert bad.returncode == 1 and "--to must be a version number" in flat(bad)


def test_keep_versions_drops_the_oldest(sandbox, deployed):
    doc = recipe(sandbox["hf"], max_length=180, keep_versions=1)
    (sandbox["recipes"] / "tiny.json").write_text(json.dumps(doc))
    proc = deploy(sandbox)
    assert "removed version 1" in proc.stdout and "removed version 2" in proc.stdout
    assert current(sandbox) == 4 and kept(sandbox) == [3, 4]


def test_a_running_serve_keeps_its_version_and_says_when_another_is_installed(sandbox, deployed):
    """The decision (docs/reliability.md): a running server keeps answering from the version it loaded and says, in
    its log and /health, that another is installed and a restart serves it; measured: the per-request check is one
    stat."""
    import httpx2 as httpx
    from scripts.serve import server as sv
    log = sandbox["root"] / "serve.log"
    plan = sv.plan_serve(sandbox["cache"], sandbox["installed"], "tiny-ver:4", port=0)
    env = {k: sandbox["env"][k] for k in ("HOME", "XDG_CACHE_HOME")}
    body = {"model": "tiny-ver:4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}
    with sv.ServerProcess(plan, log_path=log, env=env) as srv:
        before = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=120).json()
        rolled = invoke(sandbox, "rollback", "--model", "tiny", "--to", "3")
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        after = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=120).json()
        health = httpx.get(srv.url + "/health", timeout=30).json()
        back = invoke(sandbox, "rollback", "--model", "tiny", "--to", "4")
        assert back.returncode == 0
        again = httpx.get(srv.url + "/health", timeout=30).json()
    assert after["choices"][0]["message"] == before["choices"][0]["message"], "the loaded version answers on"
    assert health["installed"] == "tiny-ver:3" and health["restart_to_serve_installed"] is True
    assert again == {**again, "installed": "tiny-ver:4", "restart_to_serve_installed": False}
    text = " ".join(log.read_text().split())
    assert ("tiny-ver:3 is now the installed current version (a deploy or `invoke rollback`); this server keeps "
            "serving tiny-ver:4 from the files it loaded. Restart `invoke serve` to serve tiny-ver:3.") in text
    assert text.count("is now the installed current version") == 1 and "Traceback" not in text


# ----- kill -9 during a rollback ---------------------------------------------------------------------------------------
ROLLBACK_KILLS = [("rollback:start", False, "old"), ("rollback:staged", False, "old"),
                  ("rollback:swapped", False, "new"), ("rollback:staged", True, "old"),
                  ("rollback:old-moved", True, None), ("rollback:swapped", True, "new")]


@pytest.mark.parametrize("point, no_exchange, after", ROLLBACK_KILLS,
                         ids=[f"{p}{'-no-exchange' if n else ''}" for p, n, _ in ROLLBACK_KILLS])
def test_a_kill_during_rollback_leaves_one_current_version_that_loads_and_answers(sandbox, deployed, point,
                                                                                  no_exchange, after):
    before = current(sandbox)
    to = 3 if before == 4 else 4
    env = {KILL_ENV: point, **({NO_EXCHANGE_ENV: "1"} if no_exchange else {})}
    killed = invoke(sandbox, "rollback", "--model", "tiny", "--to", str(to), **env)
    assert killed.returncode == KILLED, killed.stdout + killed.stderr
    if after is None:  # two renames: the documented window without the model, until the next command
        assert not sandbox["installed"].exists()
    else:
        assert current(sandbox) == (before if after == "old" else to)
    check = invoke(sandbox, "check", "--model", "tiny")
    no_traceback(check)
    assert check.returncode == 0, check.stdout + check.stderr
    now = current(sandbox)
    assert now == (to if after == "new" else before)
    assert f"tiny-ver:{now}" in check.stdout and "│ answer" in check.stdout
    stars = [line for line in model_lines(sandbox) if line.startswith("*")]
    assert len(stars) == 1 and stars[0].startswith(f"* rel/tiny-ver:{now}"), stars
    assert not [p for p in sandbox["installed"].parent.iterdir() if LEFTOVER.match(p.name)]
    assert [m["name"] for m in list_cache(sandbox["cache"])] == ["tiny-ver"]
    assert (sandbox["installed"] / MANIFEST).is_file()


@pytest.mark.parametrize("point", ["version:staged", "version:swapped"])
def test_a_kill_while_keeping_a_version_leaves_the_installed_one_and_the_next_deploy_completes(sandbox, deployed,
                                                                                               point):
    before = current(sandbox)
    doc = json.loads((sandbox["recipes"] / "tiny.json").read_text())
    doc["generation"]["max_length"] = 160 if doc["generation"]["max_length"] != 160 else 170
    (sandbox["recipes"] / "tiny.json").write_text(json.dumps(doc))
    killed = invoke(sandbox, "deploy", "--model", "tiny", "--skip-proof", **{KILL_ENV: point})
    assert killed.returncode == KILLED, killed.stdout + killed.stderr
    assert current(sandbox) == before and (sandbox["installed"] / MANIFEST).is_file()
    check = invoke(sandbox, "check", "--model", "tiny")
    assert check.returncode == 0 and f"tiny-ver:{before}" in check.stdout, check.stdout + check.stderr
    proc = deploy(sandbox)
    assert current(sandbox) > before and f"installed rel/tiny-ver:{current(sandbox)}" in proc.stdout
    stars = [line for line in model_lines(sandbox) if line.startswith("*")]
    assert len(stars) == 1 and stars[0].startswith(f"* rel/tiny-ver:{current(sandbox)}")
    root = versions_root(sandbox["cache"], "rel", "tiny-ver")
    assert not [p for p in root.iterdir() if LEFTOVER.match(p.name)], "the killed copy's leftovers are gone"
