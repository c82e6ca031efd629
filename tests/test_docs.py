"""The documentation holds together: every link in README.md and docs/*.md resolves, every page of
docs/ is reachable from the README, and the README stays short enough to read in ten minutes.

A relative link must name a file or folder inside the repository; a `#anchor`, alone or after a
Markdown file, must be the anchor GitHub gives one of that file's headings: the heading's text
lowercased, every character but letters, digits, spaces, '-' and '_' dropped, each space turned into
'-', and a repeated anchor numbered (`-1`, `-2`, …). Code (fenced blocks and `inline code`) holds no
links; web links (http:, https:, mailto:) are not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 220

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
# [text](target) and ![alt](target), an optional "title" after the target; [text][ref] is resolved
# through its definition line, `[ref]: target`.
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> list[str]:
    """The page's lines, one for one, with what is code blanked: fenced blocks become empty lines
    and inline code spans (which may run over a line break inside a paragraph) become 'x's."""
    lines, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            lines.append("")
        elif opening:
            fence = opening.group(1)
            lines.append("")
        else:
            lines.append(line)
    masked, block = [], []
    for line in [*lines, ""]:  # a block: lines between blank ones; a heading or table row alone
        alone = HEADING.match(line) or line.lstrip().startswith("|")
        if block and (not line.strip() or alone):
            joined = INLINE_CODE.sub(lambda span: re.sub(r"[^\n]", "x", span.group(0)), "\n".join(block))
            masked.extend(joined.split("\n"))
            block = []
        if alone:
            masked.append(INLINE_CODE.sub(lambda span: "x" * len(span.group(0)), line))
        elif line.strip():
            block.append(line)
        else:
            masked.append(line)
    return masked[:len(lines)]


def heading_text(markdown: str) -> str:
    """The text GitHub renders for a heading's Markdown: code spans keep their content verbatim;
    elsewhere links become their text and emphasis markers, images and HTML tags go."""
    parts, last = [], 0
    for span in INLINE_CODE.finditer(markdown):
        parts.append(_plain(markdown[last:span.start()]))
        parts.append(span.group(2).strip())
        last = span.end()
    parts.append(_plain(markdown[last:]))
    return "".join(parts)


def _plain(markdown: str) -> str:
    markdown = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", markdown)  # images render no text
    markdown = INLINE_LINK.sub(lambda link: link.group(1), markdown)
    markdown = re.sub(r"<[^>]+>", "", markdown)
    markdown = markdown.replace("*", "")
    return re.sub(r"(?<!\w)_+|_+(?!\w)", "", markdown)  # _emphasis_, not snake_case


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's rendered text (github-slugger's rule)."""
    kept = re.sub(r"[^\w\- ]", "", heading_text(heading).lower())
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    original = page.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(prose(page.read_text(encoding="utf-8"))):
        if not HEADING.match(line):
            continue
        base = slug(HEADING.match(original[number]).group(2))  # the heading as written, code and all
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on a page, code excluded."""
    found = []
    for number, line in enumerate(prose(page.read_text(encoding="utf-8")), start=1):
        definition = DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
        else:
            found.extend((number, match.group(2)) for match in INLINE_LINK.finditer(line))
    return found


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """One line per link of `page` that does not resolve: `file:line: target: why`."""
    problems = []
    for number, target in links(page):
        where = f"{page.relative_to(root)}:{number}: {target}"
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        if not path and not anchor:
            problems.append(f"{where}: empty link")
            continue
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file or folder")
        elif anchor and (resolved.is_dir() or resolved.suffix.lower() != ".md"):
            problems.append(f"{where}: an anchor into something that is not a Markdown file")
        elif anchor and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading of {resolved.name} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_resolves_to_a_file_and_a_heading(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_is_at_most_220_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ and link it"


def test_every_page_of_docs_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)}
    orphans = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert len(PAGES) > 1 and not orphans, f"docs/ pages the README does not link: {orphans}"


@pytest.mark.parametrize("heading, anchor", [
    ("Training on a SLURM cluster", "training-on-a-slurm-cluster"),
    ("Execution: factorized or composed", "execution-factorized-or-composed"),
    ("Training speed on one H200", "training-speed-on-one-h200"),
    ("`run.stop_check_every` and the 120 s warning", "runstop_check_every-and-the-120-s-warning"),
    ("What's *new*, in [the API](design.md)?", "whats-new-in-the-api"),
    ("snake_case _emphasis_ × 2", "snake_case-emphasis--2"),
])
def test_anchors_follow_githubs_rule(heading, anchor):
    assert slug(heading) == anchor


def test_the_checker_reports_each_broken_link_and_passes_good_ones(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n## A section: here\n\n"
        "[good file](docs/other.md) [good anchor](docs/other.md#twice-1) [here](#a-section-here)\n"
        "[web](https://example.org/#nothing) `[in code](missing.md)`\n\n"
        "```\n[in a block](missing.md)\n```\n\n"
        "[no file](docs/missing.md) [no heading](docs/other.md#twice-2) [no anchor](#nowhere)\n"
        "[outside](../elsewhere.md) and a `code span\nover two lines` [after it](#after) `and more`\n\n"
        "[ref]: docs/gone.md\n",
        encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        "README.md:12", "README.md:12", "README.md:12", "README.md:13", "README.md:14", "README.md:16"]
    assert [problem.split(": ")[1] for problem in problems] == [
        "docs/missing.md", "docs/other.md#twice-2", "#nowhere", "../elsewhere.md", "#after", "docs/gone.md"]
