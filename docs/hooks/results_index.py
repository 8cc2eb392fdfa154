"""MkDocs hook: every `docs/results/*.md` page appears in the nav and in the results index.

Other issues add results pages; nobody edits mkdocs.yml or the index for them. `on_nav` appends
the pages to the "Results" section of the nav; `on_page_markdown` fills the
`<!-- results-list -->` marker of results/index.md with links titled by each page's first
heading.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- results-list -->"


def _title(path: Path) -> str:
  for line in path.read_text(encoding="utf-8").splitlines():
    m = re.match(r"#\s+(.+)", line)
    if m:
      return m.group(1).strip()
  return path.stem.replace("-", " ").replace("_", " ")


def results_list(results_dir: Path) -> str:
  pages = sorted(p for p in results_dir.glob("*.md") if p.name != "index.md")
  if not pages:
    return "*No results pages yet.*"
  return "\n".join(f"- [{_title(p)}]({p.name})" for p in pages)


def on_page_markdown(markdown, page, config, files):
  if page.file.src_uri == "results/index.md" and MARKER in markdown:
    return markdown.replace(MARKER, results_list(Path(config["docs_dir"]) / "results"))
  return markdown


def on_nav(nav, config, files):  # MkDocs hook signature
  from mkdocs.structure.nav import Section

  section = next((item for item in nav.items
                  if isinstance(item, Section) and item.title == "Results"), None)
  if section is None:
    return nav
  listed = {page.file.src_uri for page in nav.pages}
  extra = sorted((f for f in files.documentation_pages()
                  if f.src_uri.startswith("results/") and f.src_uri not in listed
                  and f.page is not None), key=lambda f: f.src_uri)
  for f in extra:
    f.page.parent = section
    section.children.append(f.page)
  if extra:  # re-thread previous / next links through the new pages
    pages = list(_pages(nav.items))
    nav.pages[:] = pages
    for prev, nxt in zip([None, *pages[:-1]], pages):
      if prev is not None:
        prev.next_page, nxt.previous_page = nxt, prev
    pages[0].previous_page, pages[-1].next_page = None, None
  return nav


def _pages(items):
  from mkdocs.structure.pages import Page

  for item in items:
    if isinstance(item, Page):
      yield item
    elif getattr(item, "children", None):
      yield from _pages(item.children)
