"""The project stands alone: what code and docs cite under docs/ exists, pages and sections."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SOURCES = ("mre", "data_prep", "configs", "tests", "launch")


def _headings(page):
  with open(os.path.join(DOCS, page)) as f:
    return [line.lstrip("#").strip() for line in f if line.startswith("#")]


def _slug(heading):
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
  return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _source_files():
  for folder in SOURCES:
    yield from glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)


def test_code_cites_pages_and_sections_that_exist():
  cited = 0
  for path in _source_files():
    with open(path) as f:
      text = f.read()
    rel = os.path.relpath(path, ROOT)
    assert "DESIGN.md" not in text or rel == os.path.join("tests", "test_docs.py"), rel
    for page in re.findall(r"docs/([\w-]+\.md)", text):
      assert os.path.exists(os.path.join(DOCS, page)), (rel, page)
      cited += 1
    for page, section in re.findall(r"docs/([\w-]+\.md),\s+\"([^\"]+)\"", text):
      assert section in _headings(page), (rel, page, section)
  assert cited >= 3


def test_links_between_docs_pages_resolve():
  pages = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md")))
  assert {"method.md", "released_reward_form.md", "recipes.md", "toy_world.md"} <= set(pages)
  for page in pages:
    with open(os.path.join(DOCS, page)) as f:
      text = f.read()
    for target, anchor in re.findall(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)", text):
      assert target in pages, (page, target)
      if anchor:
        assert anchor in [_slug(h) for h in _headings(target)], (page, target, anchor)
    for target, section in re.findall(r"\[([\w-]+\.md), \"([^\"]+)\"\]", text):
      assert section in _headings(target), (page, target, section)


def test_code_cites_readme_sections_that_exist():
  """A README section cited in code or a message (README, then the quoted heading; the quote may
  wrap across lines) is a heading of README.md."""
  with open(os.path.join(ROOT, "README.md")) as f:
    headings = {line.lstrip("#").strip() for line in f if line.startswith("#")}
  cited = 0
  for path in _source_files():
    with open(path) as f:
      text = f.read()
    for quoted in re.findall(r"README,\s+(?:\"([^\"]+)\"|'([^']+)')", text):
      section = " ".join(re.sub(r"\n\s*#?\s*", " ", "".join(quoted)).split())
      assert section in headings, (os.path.relpath(path, ROOT), section)
      cited += 1
  assert cited >= 3
