"""Every python snippet in README.md runs as written."""

import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
  exec(compile(code, str(README), "exec"), {})
