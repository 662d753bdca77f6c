"""The documentation: every relative link of the README and docs/ resolves, and the site
(MkDocs + mkdocstrings, API reference from the docstrings) builds with warnings as errors."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no code
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:|#|/", t)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    missing = [t for t in _relative_links(page)
               if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name}: broken links {missing}"


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[ok](p.md) [gone](nope.md) ![img](x.png) [web](https://x.org) [a](#b)\n"
                    "```\n[in code](skipped.md)\n```\n")
    assert _relative_links(page) == ["p.md", "nope.md", "x.png"]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs / mkdocstrings not installed (the dev extra has them)")
def test_site_builds_strict(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line]
    assert run.returncode == 0, "\n".join(warnings) or run.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").stat().st_size > 100_000
