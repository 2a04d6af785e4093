"""The documentation against the tree: the API reference covers the public
API, links and the contributor's guide name files that exist, the README
stays short, and every page is reachable from the site's navigation.

The site itself is built by CI (`mkdocs build --strict`, see .ci/run); these
checks need no MkDocs and run with the rest of the suite."""

import re
from pathlib import Path

import pytest

import triton_bloom

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
GUIDE = ROOT / "CONTRIBUTING.md"
API_PAGE = DOCS / "api.md"
PAGES = sorted(DOCS.glob("*.md"))

# [text](target) and ![alt](target), target without spaces; an optional title is dropped.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path into the repository as the guide writes them: a top-level folder of
# the tree, or one of the files at the top.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:triton_bloom|kernels|tests|bench|docs|examples)/[\w./-]*|\.ci/run\b"
    r"|pyproject\.toml|mkdocs\.yml|README\.md|CONTRIBUTING\.md)"
)
# A placeholder in a path (`tests/test_<area>.py`, `gpu_suite_<UTC date>/`) names no one file.
PLACEHOLDER_AFTER = ("<", "*", "{")


def _without_code_blocks(text: str) -> str:
    # Links inside fenced code are code, not links.
    return re.sub(r"```.*?```", "", text, flags=re.S)


def relative_links(path: Path):
    """``(target, resolved file)`` of every relative link in ``path``."""
    for target in LINK.findall(_without_code_blocks(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same page
        file_part = target.split("#", 1)[0]
        yield target, (path.parent / file_part).resolve()


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 250, f"README.md has {lines} lines; move the detail into docs/ (the limit is 250)"


def test_every_public_name_is_in_the_api_reference():
    entries = set(re.findall(r"^:::\s*triton_bloom\.(\w+)\s*$", API_PAGE.read_text(encoding="utf-8"), re.M))
    missing = sorted(set(triton_bloom.__all__) - entries)
    assert not missing, f"docs/api.md has no '::: triton_bloom.NAME' entry for {missing}"
    stale = sorted(name for name in entries if not hasattr(triton_bloom, name))
    assert not stale, f"docs/api.md documents names triton_bloom does not have: {stale}"


@pytest.mark.parametrize("page", [README, GUIDE, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = [target for target, resolved in relative_links(page) if not resolved.exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_the_link_check_sees_links():
    # The README's table of pages is made of links: a pattern that found none
    # would pass every page above without checking anything.
    targets = [target for target, _ in relative_links(README)]
    assert "docs/api.md" in targets and any(t.startswith("bench/results/") for t in targets), targets


def named_paths(text: str):
    """The repository paths ``text`` names, placeholders left out."""
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        following = text[match.end() : match.end() + 1]
        if following in PLACEHOLDER_AFTER or path.endswith("_"):
            continue
        yield path


def test_the_contributors_guide_names_files_that_exist():
    named = sorted(set(named_paths(GUIDE.read_text(encoding="utf-8"))))
    # The guide is a map of the tree: it names the layers' files by the dozen.
    assert len(named) > 30, named
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_files_that_exist(page):
    # Commands and file tables name paths in code, not links: `python bench/perf/speed.py`.
    missing = sorted({path for path in named_paths(page.read_text(encoding="utf-8")) if not (ROOT / path).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_path_pattern_skips_placeholders_only():
    text = "see `tests/test_<area>.py`, `bench/results/gpu_suite_<UTC date>/` and `kernels/lookup.py`."
    assert list(named_paths(text)) == ["kernels/lookup.py"]


def test_every_page_is_in_the_navigation():
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M))
    pages = {page.name for page in PAGES}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"mkdocs.yml's nav names pages that do not exist: {sorted(nav - pages)}"
