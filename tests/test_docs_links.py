"""Every relative link and image in the documentation resolves (no model; well under a second).

Checked: README.md, docs/*.md and results/*.md. A link `[text](target)` or image `![alt](target)`
outside code resolves to an existing file or directory relative to the page, and an anchor
`#heading` to a heading of the target markdown file, slugged as GitHub does. Web links (http, https, mailto) are
not followed.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 250

#: [text](target) and ![alt](target); the target ends at the first space (a title may follow) or ")".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*.md"))]


def base_dir(page: Path) -> Path:
    """Where the page's relative links start: its folder."""
    return page.parent


def prose_lines(text: str, strip_code: bool = True):
    """(line number, line) outside fenced code blocks, inline code removed unless strip_code is off."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, INLINE_CODE.sub("", line) if strip_code else line


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target); a target of None marks a link this line-by-line reading cannot parse
    (its text split over two lines), which is reported rather than skipped."""
    out = []
    for n, line in prose_lines(text):
        found = [m[1] for m in LINK.finditer(line)]
        out += [(n, t) for t in found] + [(n, None)] * (line.count("](") - len(found))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), strip_code=False):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m[1])
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return frozenset(out)


def broken(page: Path) -> list[str]:
    """'line: target (why)' for every link of the page that does not resolve."""
    out = []
    for n, target in links(page.read_text(encoding="utf-8")):
        if target is None:
            out.append(f"{page.relative_to(ROOT)}:{n}: a link split over lines (keep [text](target) on one line)")
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (base_dir(page) / path_part).resolve() if path_part else page
        if not dest.exists():
            out.append(f"{page.relative_to(ROOT)}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{page.relative_to(ROOT)}:{n}: {target} (no heading #{anchor})")
    return out


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert broken(page) == []


def test_pages_found():
    names = {str(p.relative_to(ROOT)) for p in pages()}
    assert {"README.md", "docs/index.md"} <= names
    assert any(n.startswith("results/") for n in names)


def test_results_pages_are_dated_and_listed():
    """Every results page is named results/YYYY-MM-DD-<topic>.md and listed in docs/index.md."""
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "results").glob("*.md")):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md", page.name), page.name
        assert f"../results/{page.name}" in index, f"{page.name} is not listed in docs/index.md"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LIMIT


def test_checker_catches_a_broken_link(tmp_path, monkeypatch):
    """The checker itself: a missing file and a missing heading are reported, code is not read."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some `code` heading, twice\n\n## Some code heading, twice\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text(
        "[ok](a.md#title) [ok](a.md#some-code-heading-twice-1) ![ok](a.md) [web](https://x.y/z)\n"
        "[bad](missing.md) [bad anchor](a.md#nope) `[in code](nowhere.md)`\n"
        "[split\nlink](a.md)\n"
        "```\n[in a block](nowhere.md)\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert broken(page) == [
        "docs/b.md:2: missing.md (no such file)",
        "docs/b.md:2: a.md#nope (no heading #nope)",
        "docs/b.md:4: a link split over lines (keep [text](target) on one line)",
    ]
