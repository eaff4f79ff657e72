"""The docs a newcomer navigates: README.md is a short front door with a map, docs/ holds the rest.

Every relative link in README.md and docs/**/*.md resolves: to a file or folder in this repository
and, with a `#fragment`, to a heading of the Markdown file it names (GitHub's anchor slugs). Every
docs page is reachable from the README's map, directly or through a docs index (a README.md in
docs/). The reference pages name what the code defines: every command and option, every recipe.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import typer

from fixtures import REPO
from reprotune import cli as cli_module
from reprotune.recipes import RECIPES

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 220

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[ \t]*$", re.S | re.M)  # fenced code blocks
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
REPO_PATH = re.compile(r"^(?:src|tests|bench|stages|deploy|docs|\.github|\.ci)/[\w./-]*[\w/]$")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks (a `#` comment in a bash block is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered, lowercased, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    kept = [ch for ch in text.lower()
            if ch in " -_" or unicodedata.category(ch)[0] in "LM" or unicodedata.category(ch) == "Nd"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every `#fragment` GitHub gives the headings of `path` (repeats get -1, -2, ...) and its HTML anchors."""
    text = prose(path.read_text())
    seen: Counter[str] = Counter()
    out = set(HTML_ANCHOR.findall(text))
    for _, heading in HEADING.findall(text):
        base = slug(heading)
        out.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


def links(path: Path) -> list[str]:
    """The targets of the Markdown links in `path`, outside code blocks and code spans."""
    return LINK.findall(CODE_SPAN.sub("", prose(path.read_text())))


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` that does not resolve, with the reason."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not ours to check
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if REPO not in resolved.parents and resolved != REPO:
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (resolved.suffix != ".md" or fragment not in anchors(resolved)):
            broken.append(f"{target}: no heading with that anchor in {resolved.relative_to(REPO)}")
    return broken


def linked_pages(path: Path) -> set[Path]:
    """The Markdown files `path` links to (fragments dropped)."""
    out = set()
    for target in links(path):
        file_part = target.partition("#")[0]
        if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part, re.I):
            resolved = (path.parent / file_part).resolve()
            out.add(resolved / "README.md" if resolved.is_dir() else resolved)
    return {page for page in out if page.suffix == ".md" and page.exists()}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path, monkeypatch):
    # The checker itself: a page in a throwaway tree with one good link and three bad ones.
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.md").write_text("# A page: `its` title\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#a-page-its-title) [ok](docs/a.md#twice-1) [gone](docs/b.md) "
                    "[typo](docs/a.md#a-page) [up](../../x.md)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["docs/b.md: no such file",
                                  "docs/a.md#a-page: no heading with that anchor in docs/a.md",
                                  "../../x.md: outside the repository"]


def test_slugs_follow_githubs_rules():
    assert slug("Serving: `reprotune serve`") == "serving-reprotune-serve"
    assert slug("What \"bitwise\" means") == "what-bitwise-means"
    assert slug("Augmentation's share of a step") == "augmentations-share-of-a-step"
    assert slug("6. Experiments travel without commits") == "6-experiments-travel-without-commits"
    assert slug("Why `train.grad_clip` is 1.0") == "why-traingrad_clip-is-10"
    assert slug("See [the docs](docs/README.md) — here") == "see-the-docs--here"


def test_the_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    headings = [heading for _, heading in HEADING.findall(prose(README.read_text()))]
    for section in ("The two commands", "The offline demo", "Three daily habits", "The docs"):
        assert section in headings, section
    for habit in ("dvc repro", "dvc exp run -S", "dvc metrics diff"):
        assert habit in README.read_text(), habit


def test_every_docs_page_is_reachable_from_the_readmes_map():
    # From the README, directly or through a docs index (docs/**/README.md), not a chain of pages.
    reached, indexes = set(linked_pages(README)), [p for p in linked_pages(README) if p.name == "README.md"]
    while indexes:
        for page in linked_pages(indexes.pop()) - reached:
            reached.add(page)
            if page.name == "README.md":
                indexes.append(page)
    unreached = [str(p.relative_to(REPO)) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in reached]
    assert unreached == []


def test_files_the_docs_name_exist():
    # A path in backticks (`src/reprotune/training/loop.py`, `tests/test_kill.py`) names a real file.
    missing = set()
    for path in markdown_files():
        for _, span in CODE_SPAN.findall(prose(path.read_text())):
            name = span.strip()
            if REPO_PATH.match(name) and not (REPO / name).exists():
                missing.add(f"{path.relative_to(REPO)}: {name}")
    assert sorted(missing) == []


def test_the_architecture_page_lists_every_module_of_the_package():
    # docs/development/architecture.md's tree is the package's table of contents: every module, no ghosts.
    text = (DOCS / "development/architecture.md").read_text()
    block = re.search(r"^## The package.*?^```\n(.*?)^```", text, re.S | re.M).group(1)
    listed, package = set(), None
    for line in block.splitlines()[1:]:  # after the `src/reprotune/` line
        match = re.match(r"^( +)(\w+(?:\.py|/))", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if name.endswith("/"):
            package = (indent, name)
        elif package and indent > package[0]:
            listed.add(package[1] + name)
        else:
            package = None
            listed.add(name)
    source = REPO / "src/reprotune"
    modules = {p.relative_to(source).as_posix() for p in source.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []


def _cli_reference_sections() -> dict[str, str]:
    text = (DOCS / "reference/cli.md").read_text()
    parts = re.split(r"^## `reprotune ([\w-]+)[^`]*`$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_cli_reference_names_every_command_and_option():
    app = next(value for value in vars(cli_module).values() if isinstance(value, typer.Typer))
    commands = typer.main.get_command(app).commands
    sections = _cli_reference_sections()
    assert set(sections) == set(commands)
    for name, command in commands.items():
        options = {opt for param in command.params if not getattr(param, "hidden", False)
                   for opt in param.opts if opt.startswith("--") and opt != "--help"}
        missing = {opt for opt in options if not re.search(rf"`{re.escape(opt)}[ `]", sections[name])}
        assert missing == set(), f"reprotune {name}"


def test_the_recipes_table_is_what_the_code_defines():
    text = (DOCS / "reference/recipes.md").read_text()
    rows = dict(re.findall(r"^\| `([\w-]+)` \| [^|]+ \| (.+) \|$", text, re.M))
    assert set(rows) == set(RECIPES)
    for name, recipe in RECIPES.items():
        assert re.findall(r"`([^`]+)`", rows[name]) == recipe.arguments()[1::2], name  # the -S key=value pairs
