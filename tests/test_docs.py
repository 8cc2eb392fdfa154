"""The docs: every tutorial's Python blocks run (and their asserts hold); the site builds strictly.

Blocks of one page run in order in one namespace, in a fresh subprocess with 8 simulated CPU
devices set before jax is imported, exactly as a reader would run them top to bottom.
Blocks inside admonitions (the worked problems' answers) are indented; they run too.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
# Pages whose code is ours to run: the home page, installation, the tutorials. (Results pages
# hold the commands of long experiments; api/ pages hold no code.)
TUTORIALS = sorted(p for p in (DOCS / "tutorials").glob("*.md") if p.name != "index.md")
PAGES = [DOCS / "index.md", DOCS / "installation.md", *TUTORIALS]

_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.DOTALL | re.MULTILINE)

# Runs the blocks of one page (path in argv[1]) in one namespace; names the failing block.
_RUNNER = r"""
import re, sys, textwrap
text = open(sys.argv[1], encoding="utf-8").read()
blocks = [(text[:m.start()].count("\n") + 2, textwrap.dedent(m.group(2)))
          for m in re.finditer(sys.argv[2], text, re.S | re.M)]
namespace = {"__name__": "__docs__"}
for line, code in blocks:
  code = "\n" * (line - 1) + code  # tracebacks point at the page's own line numbers
  exec(compile(code, sys.argv[1], "exec"), namespace)
print(f"ran {len(blocks)} blocks")
"""


def python_blocks(page: Path) -> list[str]:
  return [textwrap.dedent(m.group(2)) for m in _BLOCK.finditer(page.read_text(encoding="utf-8"))]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["NO_MKDOCS_2_WARNING"] = "1"  # Material's end-of-life banner, not a build warning
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def test_every_tutorial_is_listed():
  names = {p.stem for p in TUTORIALS}
  assert names == {"rooflines", "sharded-matrices", "collectives", "transformer-accounting",
                   "parallelising-training", "inference"}


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_has_worked_problems(page):
  text = page.read_text(encoding="utf-8")
  questions = re.findall(r'^\?\?\? question "', text, re.MULTILINE)
  answers = re.findall(r'^\?\?\? success "Answer"', text, re.MULTILINE)
  assert len(questions) >= 3 and len(questions) == len(answers), page.name
  blocks = python_blocks(page)
  assert blocks and sum(b.count("assert") for b in blocks) >= 5, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page):
  if not python_blocks(page):
    pytest.fail(f"{page.relative_to(ROOT)} has no python blocks; drop it from PAGES")
  proc = subprocess.run([sys.executable, "-c", _RUNNER, str(page), _BLOCK.pattern], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, f"{page.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def test_key_numbers_are_asserted():
  """The issue's acceptance numbers appear in executed asserts."""
  code = {p.stem: "\n".join(python_blocks(p)) for p in TUTORIALS}
  assert "critical_intensity - 240" in code["rooflines"]
  assert "round(alpha) == 2550" in code["parallelising-training"]
  assert "70.4e9" in code["transformer-accounting"]
  assert "cost_analysis()" in code["transformer-accounting"]
  for case in ("case1 == {}", 'case2 == {"all-gather": 1}',
               'case3_replicated == {"all-reduce": 1}', 'case4 == {"all-gather": 1}'):
    assert case in code["sharded-matrices"], case
  assert "plan.fsdp == 1024 and plan.sequence == 2 and plan.tensor == 4" in code[
      "parallelising-training"]


def test_mkdocs_build_strict(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                         str(tmp_path / "site")], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-8000:]
  assert not re.search(r"^(WARNING|ERROR)\b", proc.stderr, re.MULTILINE), proc.stderr[-8000:]
  site = tmp_path / "site"
  for page in ("index.html", "installation/index.html", "results/index.html",
               "api/scaling/index.html", "tutorials/rooflines/index.html"):
    assert (site / page).exists(), page
  api = (site / "api/scaling/index.html").read_text(encoding="utf-8")
  assert "critical_intensity" in api and "plan" in api  # rendered from docstrings


def test_results_pages_join_nav_and_index(tmp_path):
  """A results page another issue adds shows up in the nav and the index, with no edits."""
  import shutil
  shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
  shutil.copytree(DOCS, tmp_path / "docs")
  (tmp_path / "docs" / "results" / "zz-example.md").write_text(
      "# An example result\n\nSee [the tutorials](../tutorials/index.md).\n")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                         str(tmp_path / "site")], cwd=tmp_path, env=_env(), capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-8000:]
  index = (tmp_path / "site" / "results" / "index.html").read_text(encoding="utf-8")
  assert 'href="zz-example/">An example result</a>' in index
  home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
  assert "An example result" in home  # in the navigation sidebar


def test_results_index_lists_pages(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("results_index",
                                                DOCS / "hooks" / "results_index.py")
  hook = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hook)
  assert hook.results_list(tmp_path) == "*No results pages yet.*"
  (tmp_path / "index.md").write_text("# Results\n")
  (tmp_path / "paretoq.md").write_text("# ParetoQ at small scale\n\ntext\n")
  (tmp_path / "quest.md").write_text("no heading\n")
  assert hook.results_list(tmp_path) == "- [ParetoQ at small scale](paretoq.md)\n- [quest](quest.md)"
