"""The README stays a short user's guide and the docs stay linked: no dead links, no missing tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300

# [text](target) and ![alt](target); the target ends at whitespace or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TOOL = re.compile(r"(?<![\w/])tools/[\w/]+\.py\b")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links in ``text`` that name a file of this checkout (no URL, no bare anchor)."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move details to docs/"


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    missing = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_tools_named_in_readme_exist():
    named = sorted(set(TOOL.findall(README.read_text(encoding="utf-8"))))
    assert named, "README.md names no tools/*.py"
    missing = [t for t in named if not (ROOT / t).is_file()]
    assert not missing, f"README.md names tools that do not exist: {missing}"


def test_docs_index_lists_every_page():
    index = DOCS / "README.md"
    assert index.is_file(), "docs/README.md (the index of docs/) is missing"
    listed = {Path(t).name for t in relative_links(index.read_text(encoding="utf-8"))}
    pages = {p.name for p in DOCS.glob("*.md") if p.name != "README.md"}
    assert pages <= listed, f"docs/README.md does not list: {sorted(pages - listed)}"


def test_relative_links_parser():
    page = "see [a](docs/a.md#x), ![b](b.png), [c](https://x.org/c.md), [d](#top), [e](e.json \"title\")"
    assert relative_links(page) == ["docs/a.md", "b.png", "e.json"]


COMMAND = re.compile(r"(?:\bpython|\btorchrun[^\n]*?)\s+(tools/[\w/]+\.py)([^\n`|#]*)")
SUBCOMMANDS = {"tools/bench.py", "tools/make_data.py", "tools/weights.py"}


def documented_commands() -> list[tuple[str, str | None, list[str]]]:
    """(tool, subcommand, long flags) of every ``python tools/...`` command in the README and docs/*.md."""
    found = set()
    for page in _markdown_files():
        text = re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))  # join continued lines
        for tool, rest in COMMAND.findall(text):
            words = rest.split()
            sub = words[0] if tool in SUBCOMMANDS and words and not words[0].startswith("-") else None
            flags = tuple(sorted(set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest))))
            found.add((tool, sub, flags))
    return sorted(found, key=str)


# Runs each tool's --help inside one interpreter (torch is imported once, not once per tool).
_HELPS = r"""
import contextlib, io, json, os, runpy, sys
out = {}
for tool, sub in json.loads(sys.argv[1]):
    sys.path.insert(0, os.path.abspath(os.path.dirname(tool)))  # as `python tool` would
    sys.argv = [tool, *([sub] if sub else []), "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(tool, run_name="__main__")
        except SystemExit:
            pass
    sys.path.pop(0)
    out[f"{tool} {sub}"] = buf.getvalue()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_documented_flags_exist():
    """Every flag of a documented command is in that tool's --help."""
    import json
    import subprocess
    import sys

    commands = documented_commands()
    assert commands, "no documented commands found"
    keys = sorted({(tool, sub) for tool, sub, _ in commands}, key=str)
    done = subprocess.run([sys.executable, "-c", _HELPS, json.dumps(keys)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    helps = json.loads(done.stdout.strip().splitlines()[-1])
    empty = [k for k, text in helps.items() if "--help" not in text]
    assert not empty, f"tools whose --help printed nothing: {empty}"
    wrong = [f"{tool} {sub or ''} {f}" for tool, sub, flags in commands for f in flags
             if f not in helps[f"{tool} {sub}"]]
    assert not wrong, f"documented flags that the tools do not have: {sorted(set(wrong))}"
