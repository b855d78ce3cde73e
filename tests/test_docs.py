"""The front page and docs stay true: links resolve, the README is short, and every number the README
links to a result file is in that file (a re-recording that changes it fails here until the README
follows)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)(#[^)]*)?\)")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _links(page: Path):
    for text, target, _ in LINK.findall(page.read_text()):
        if not re.match(r"[a-z]+://", target):
            yield text, (page.parent / target).resolve()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    missing = [str(t.relative_to(REPO)) for _, t in _links(page) if not t.exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert lines[2] == "```bash" and lines[3].startswith("make run") and lines[4].startswith("make test")


def _numbers_in(text: str) -> list[str]:
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def test_every_number_the_readme_links_is_in_its_source():
    """A link whose text holds a number must point at a file that holds that number."""
    checked, wrong = 0, []
    for text, target in _links(REPO / "README.md"):
        if target.suffix not in (".md", ".csv", ".log", ".yaml", ".json") or not target.exists():
            continue
        source = target.read_text().replace(",", "")
        for n in _numbers_in(text):
            checked += 1
            if n not in source:
                wrong.append(f"{n} ({text!r} -> {target.relative_to(REPO)})")
    assert checked >= 20 and not wrong, wrong


def test_no_code_cites_a_spec_outside_the_repository():
    pattern = re.compile(r"dlora-algorithm\.md|lora-kernels\.md|§6|defect \d")
    hits = [f"{p.relative_to(REPO)}:{i}" for root in ("dlora_sim", "dlora_gpu", "calibration", "benchmarks", "conf")
            for p in (REPO / root).rglob("*") if p.suffix in (".py", ".yaml")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_the_makefiles_torch_pin_is_pyprojects():
    """`make install-runtime` installs CPU torch first by the Makefile's pin; the extras must ask for the same."""
    pins = set(re.findall(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text()))   # no tomllib on 3.10
    make = re.search(r"^TORCH := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert pins == {make}
