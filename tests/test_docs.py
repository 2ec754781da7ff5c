"""The documentation: the README is a short front door, every relative link of README.md and docs/ resolves,
and no file of the repository refers to a path outside it."""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [p for p in files if p.suffix in (".py", ".md", ".sh", ".txt", ".cpp", ".h", ".cu", ".yaml", ".toml", ".cfg")
            and p.exists()]


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    # the two set-up commands, and the quickstarts in the order users arrive
    assert "bash scripts/install.sh && .venv/bin/p2t train" in text and "bash .ci/run" in text
    heads = [h for h in re.findall(r"^## (.+)$", text, flags=re.M)]
    order = [h for h in heads if h.startswith("Quickstart")]
    assert order == ["Quickstart: TRL", "Quickstart: verl", "Quickstart: the scorer", "Quickstart: the ops",
                     "Quickstart: the command line"]
    for page in ("docs/ops.md", "docs/engine.md", "docs/lab.md", "docs/performance.md", "docs/integrations.md"):
        assert f"]({page})" in text, page


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_docs_link_back_to_the_readme():
    for page in DOCS[1:]:
        assert "](../README.md)" in page.read_text(encoding="utf-8"), page.name


def test_no_path_outside_the_repository():
    bad = []
    for p in _tracked_text_files():
        if p.resolve() == pathlib.Path(__file__).resolve():
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if "../shared" in line:
                bad.append(f"{p.relative_to(ROOT)}:{i}")
    assert not bad, "references to a path outside the repository: " + ", ".join(bad)
