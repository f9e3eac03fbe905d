"""Build the sdist and the wheel, check them, and run the README's example from the wheel.

    .venv/bin/python scripts/check_wheel.py

1. ``python -m build`` makes both with no warning;
2. ``twine check --strict`` passes (the metadata and README render on the package index);
3. the wheel holds LICENSE and ``py.typed`` and no tests; the sdist ships no tests (they need
   the repository's docs, notebooks and scripts);
4. a fresh virtual environment installs the wheel (and its dependencies, nothing else) and
   runs the README's example from another folder: it prints what the README says, with
   ``jaxbn`` imported from the environment, not from the checkout.

Exit status 0 when all hold; otherwise the first failure is printed.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_readme import PRINTS  # noqa: E402
from tests.test_readme import matches  # noqa: E402


def _run(cmd: list[str], **kwargs) -> tuple[str, str]:
  """(stdout, stderr) of ``cmd``; exits with both when it fails."""
  print("+", " ".join(cmd).split("\n", 1)[0], flush=True)
  done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  if done.returncode:
    raise SystemExit(f"failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
  return done.stdout, done.stderr


def _readme_example() -> str:
  text = (ROOT / "README.md").read_text()
  section = text.split("\n## Example\n", 1)[1]
  return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


def main() -> int:
  with tempfile.TemporaryDirectory() as tmp_name:
    tmp = pathlib.Path(tmp_name)
    dist = tmp / "dist"
    # setuptools warns that it skips byte-compiling when PYTHONDONTWRITEBYTECODE is set: a
    # setting of this shell, not of the package.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    log = "\n".join(
      _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], env=env)
    )
    warnings = [line for line in log.splitlines() if re.search(r"warn", line, re.I)]
    if warnings:
      raise SystemExit("python -m build warned:\n" + "\n".join(warnings))
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])

    names = zipfile.ZipFile(wheel).namelist()
    for required in ("jaxbn/py.typed", "jaxbn/__init__.py"):
      if required not in names:
        raise SystemExit(f"{wheel.name}: no {required}")
    if not any(re.fullmatch(r"jaxbn-[^/]+\.dist-info/licenses/LICENSE", n) for n in names):
      raise SystemExit(f"{wheel.name}: no LICENSE in its .dist-info/licenses/")
    tests = [n for n in names if n.startswith("tests/") or "/tests/" in n]
    if tests:
      raise SystemExit(f"{wheel.name}: ships tests: {tests[:3]}")
    members = tarfile.open(sdist).getnames()
    if any("/tests/" in m for m in members):
      raise SystemExit(f"{sdist.name}: ships tests, which cannot run from it")
    if not any(m.endswith("/LICENSE") for m in members):
      raise SystemExit(f"{sdist.name}: no LICENSE")
    print(f"{wheel.name}: {len(names)} files, LICENSE and py.typed, no tests")
    print(f"{sdist.name}: {len(members)} files, LICENSE, no tests")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", str(wheel)])
    work = tmp / "elsewhere"
    work.mkdir()
    example = _readme_example()
    where, _ = _run(
      [python, "-c", "import jaxbn; print(jaxbn.__file__, jaxbn.__version__)"], cwd=work
    )
    if not where.startswith(str(venv)):
      raise SystemExit(f"jaxbn was imported from {where.split()[0]}, not from the wheel")
    printed = _run([python, "-c", example], cwd=work)[0].splitlines()  # stdout: what it prints
    expected = [m.group(1) for line in example.splitlines() if (m := PRINTS.search(line))]
    if len(printed) != len(expected) or not all(map(matches, expected, printed)):
      raise SystemExit(f"the README example printed {printed}, the README says {expected}")
    print(f"README example from the wheel ({where.split()[1]}), run in {work}: {printed}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
