"""The README and docs/ link only to files that exist and to headings that exist in them (GitHub's anchors: lower
case, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats): a results page renamed or a section retitled
breaks the links readers follow from the README's tables."""

import os
import re

from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: str) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in open(path, encoding="utf-8"):
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = anchor(heading.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def markdown_files() -> list[str]:
    docs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "docs")) for f in fs if f.endswith(".md")]
    return [os.path.join(ROOT, "README.md"), *sorted(docs)]


def broken_links(path: str) -> list[str]:
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        file, _, fragment = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif fragment and full.endswith(".md") and fragment not in headings(full):
            broken.append(f"{target} (no such heading)")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves():
    files = markdown_files()
    assert len(files) > 10
    problems = {os.path.relpath(f, ROOT): b for f in files if (b := broken_links(f))}
    assert not problems


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# Stage A: 12 epochs, 6 seeds (verdict)\n\n## Notes\n\n## Notes\n")
    (tmp_path / "a.md").write_text("[ok](b.md#stage-a-12-epochs-6-seeds-verdict) [ok](b.md#notes-1) "
                                   "[bad](b.md#stage-b) [bad](c.md) [ok](https://example.org/x#y)\n"
                                   "```\n[in code](nowhere.md)\n```\n")
    assert broken_links(str(tmp_path / "a.md")) == ["b.md#stage-b (no such heading)", "c.md (no such file)"]
