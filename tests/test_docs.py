"""The README and the docs hold together: every relative link resolves, to a file and, where it names
one, to a heading of that file; the README stays one page with its two commands and a smoke run up
front; the test command it gives is the one CI runs."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "src").rglob("README.md")])

LINK = re.compile(r"(?<!\\)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
"""A markdown link or image, capturing its target (``[text](target)``, ``![alt](target "title")``)."""
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """``text`` without code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    kept = "".join(
        c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN"
    )
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 … for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    """The relative link targets of a page (web links and mail addresses left out)."""
    targets = LINK.findall(_prose(path.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_checker_reads_links_and_headings_as_github_does(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# EWC's λ\n## Running the paper's settings on a GPU\n## A `code` heading\n## Twice\n## Twice\n"
        "```bash\n# not a heading\n[not](a-link.md)\n```\n"
        "See [a](b.md#x), ![img](c.png \"title\"), [web](https://x.org), `[code](d.md)`.\n"
    )
    assert anchors(page) == {
        "ewcs-λ", "running-the-papers-settings-on-a-gpu", "a-code-heading", "twice", "twice-1"
    }
    assert links(page) == ["b.md#x", "c.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        where = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and unquote(anchor) not in anchors(where):
            broken.append(f"{target}: no heading #{unquote(anchor)} in {where.name}")
    assert broken == [], broken


def test_the_readme_is_one_page_with_the_commands_up_front():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 210, len(lines)
    head = "\n".join(lines[:40])
    for command in ("make demo", "make test", "fedlorm run --preset smoke"):
        assert command in head, command
    assert sum(line.startswith("## Results") for line in lines) == 1


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE), ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quick:", makefile, re.MULTILINE) and '-m "not slow"' in makefile
    assert '-m "not slow"' in readme
