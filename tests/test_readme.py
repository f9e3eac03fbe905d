"""README.md and docs/*.md: their code runs and prints what they say; their links resolve.

A python block's ``# prints: TEXT`` comments, in order, are the lines the block
prints. Numbers compare within one unit of the last digit shown (``0.97``
matches 0.96 to 0.98), or within the tolerance written after them
(``0.95±0.03``); everything else compares exactly, up to whitespace.
"""

import contextlib
import io
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
PRINTS = re.compile(r"#\s*prints:\s*(.*?)\s*$")


def _snippets():
  for page in PAGES:
    text = page.read_text()
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
      line = text[: m.start()].count("\n") + 2
      yield pytest.param(page, line, m.group(1), id=f"{page.relative_to(ROOT)}:{line}")


SNIPPETS = list(_snippets())


def _unit(number: str) -> float:
  """One unit of the last digit of ``number`` as written: '0.97' -> 0.01, '2e-15' -> 1e-15."""
  mantissa, _, exponent = number.lower().partition("e")
  decimals = len(mantissa.partition(".")[2])
  return 10.0 ** (int(exponent or 0) - decimals)


def _tokens(text: str, expected: bool):
  """Numbers (value, tolerance) and single non-space characters of ``text``."""
  pattern = rf"({NUMBER})(?:±({NUMBER}))?|(\S)" if expected else rf"({NUMBER})()|(\S)"
  for number, tolerance, char in re.findall(pattern, text):
    if char:
      yield char
    else:
      yield (float(number), float(tolerance) if tolerance else _unit(number))


def matches(expected: str, actual: str) -> bool:
  """Whether the printed line ``actual`` is the documented ``expected``."""
  want, got = list(_tokens(expected, True)), list(_tokens(actual, False))
  if len(want) != len(got):
    return False
  for w, g in zip(want, got, strict=True):
    if isinstance(w, str) or isinstance(g, str):
      if w != g:
        return False
    elif abs(g[0] - w[0]) > w[1] * (1 + 1e-9):
      return False
  return True


def test_matches_numbers_within_the_last_digit_or_the_tolerance():
  assert matches("[0. 0. 0. 0.] [1. 1. 1. 1.]", "[ 0.  0. -0.  0.] [1. 1. 1. 1.]")
  assert matches("0.97", "0.9644")
  assert not matches("0.97", "0.958")
  assert matches("0.95±0.03", "0.921")
  assert not matches("0.95±0.03", "0.919")
  assert matches("2e-15", "2.8e-15") and not matches("2e-15", "3.5e-15")
  assert matches("True 8", "True  8") and not matches("True 8", "False 8")
  assert not matches("1 2", "1 2 3") and not matches("x 1", "y 1")
  assert not matches("[100. 100.]", "[100. 100. 100.]")


@pytest.mark.slow  # end-to-end: the full suite runs them, -m 'not slow' skips them
@pytest.mark.parametrize("page, line, code", SNIPPETS)
def test_snippet_prints_what_the_page_says(page, line, code):
  if re.search(r"^import torch|^from torch", code, re.M):
    pytest.importorskip("torch")
  expected = [m.group(1) for m in map(PRINTS.search, code.splitlines()) if m]
  out = io.StringIO()
  # qwix and jax2onnx need JAX's default promotion rules (conftest.py makes them strict).
  third_party = re.search(r"^import (qwix|jax2onnx)|^from (qwix|jax2onnx)", code, re.M)
  rules = (
    (jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"))
    if third_party
    else ()
  )
  with contextlib.redirect_stdout(out), contextlib.ExitStack() as stack:
    for rule in rules:
      stack.enter_context(rule)
    exec(compile("\n" * (line - 1) + code, str(page), "exec"), {"__name__": "__main__"})
  printed = [s for s in out.getvalue().splitlines() if s.strip()]
  assert len(printed) == len(expected), (printed, expected)
  for want, got in zip(expected, printed, strict=True):
    assert matches(want, got), f"{page.name}:{line}: printed {got!r}, the page says {want!r}"


def _links(page: pathlib.Path):
  text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not in code
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if not re.match(r"[a-z]+:", target):  # relative: http(s) and mailto links are not checked
      yield target


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_at_files_of_the_repository(page):
  links = list(_links(page))
  for target in links:
    path = (page.parent / target.partition("#")[0]).resolve()
    assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
    assert ROOT in path.parents, f"{page.relative_to(ROOT)}: {target} is outside the repository"


def test_every_docs_page_is_reachable_from_the_readme():
  linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README)}
  assert set(PAGES[1:]) <= linked


def test_readme_is_a_front_page_with_the_quickstart_ci_runs():
  text = README.read_text()
  assert len(text.splitlines()) <= 250
  # .ci/run runs the Quickstart block's second command: it must install the test
  # extra (which pulls every optional package) and run the whole suite in file order.
  block = re.search(r"^## Quickstart\n.*?^```bash\n(.*?)^```", text, re.S | re.M).group(1)
  commands = [c for c in block.splitlines() if c.strip() and not c.startswith("#")]
  assert '-e ".[reproduce]"' in commands[0] and "jaxbn reproduce" in commands[0]
  assert '-e ".[test]"' in commands[1] and commands[1].endswith("pytest -n 2 -p no:randomly")
