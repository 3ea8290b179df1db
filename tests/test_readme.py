"""The README's two commands stay true: CI runs the README's test command verbatim."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_and_ci_share_the_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash")[1:3]]
    assert len(blocks) == 2
    assert "mmsec attack" in blocks[0]
    assert blocks[1] in ci


def test_docs_reference_only_files_that_exist():
    """Docs and CI must not cite files the repository does not have."""
    import re

    for doc in [REPO / "README.md", REPO / ".ci" / "run", *sorted((REPO / "docs").rglob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):  # markdown links
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
        for name in re.findall(r"\b((?:tests|docs|benchmarks|recipes)/[\w./-]+\.(?:py|md|yaml))",
                               text):
            assert (REPO / name).exists(), f"{doc.name} cites missing {name}"
    # no source file cites a page the repository does not have (such as ALGORITHMS.md)
    pages = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts}
    for src in [*(REPO / "mmsec").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]:
        for page in re.findall(r"\b([A-Z][A-Z_-]+\.md)\b", src.read_text()):
            assert page in pages, f"{src.relative_to(REPO)} cites missing {page}"
