"""The docs hold together: every relative link (and #anchor) in README.md and docs/*.md resolves, every task of
`invoke --list` is in the README, and the README's test command is the one .ci/run runs."""
from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from scripts.core.settings import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without code blocks and code spans (a link there is an example, not a link)."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, spaces, '-' and '_' kept),
    spaces to '-'."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 … for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: … are not checked offline


def test_the_slug_rules():
    assert slug("Serving (`invoke serve`)") == "serving-invoke-serve"
    assert slug("Size at what fidelity: SmolLM2-135M fine-tune (2026-12-02)") == \
        "size-at-what-fidelity-smollm2-135m-fine-tune-2026-12-02"
    assert slug("The tutorial's forms") == "the-tutorials-forms"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO_ROOT)}")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_one_title_per_page(page):
    titles = [ln for ln in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines() if ln.startswith("# ")]
    assert len(titles) == 1, titles


def test_every_docs_page_is_in_the_index():
    index = (REPO_ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def invoke_tasks() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"^  ([a-z][\w.-]*)", out, re.M)


def test_every_task_is_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    tasks = invoke_tasks()
    assert len(tasks) > 10
    missing = [t for t in tasks if not re.search(rf"`invoke {re.escape(t)}[ `]", readme)]
    assert not missing, f"tasks of `invoke --list` the README does not show: {missing}"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv")
    assert f"```bash\n{ci}\n```" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_stays_short():
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
