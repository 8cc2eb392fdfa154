"""The README's example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
  text = (Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"## Compose it in your own code\n\n```python\n(.*?)```", text, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
  assert namespace["logits"].shape == (8, 64, 272)
  assert float(namespace["metrics"]["loss"]) > 0
