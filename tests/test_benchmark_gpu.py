"""benchmarks/gpu.py runs on CPU (small shapes) and reports what it says it reports."""

import importlib.util
import pathlib

import jax
import pytest

pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_runs_on_cpu(tmp_path, capsys, monkeypatch):
  monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run: its folder first on the path
  spec = importlib.util.spec_from_file_location("jaxbn_gpu_benchmark", SCRIPT)
  assert spec is not None and spec.loader is not None
  gpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpu)
  with jax.numpy_dtype_promotion("standard"):  # flax mixes bfloat16 and float32, as run
    rows = gpu.main(["--small", "--reps", "2", "--json", str(tmp_path / "out.json")])
  assert [(tuple(r["shape"]), r["dtype"], r["layout"]) for r in rows] == [
    ((4, 8, 8, c), d, "last") if layout == "last" else ((4, c, 8, 8), d, "first")
    for c in (16, 32)
    for d in ("float32", "bfloat16")
    for layout in ("last", "first")
  ]
  for r in rows:
    assert set(r["ms"]) == {"jaxbn train", "flax train", "jaxbn infer", "flax infer", "copy"}
    assert all(v > 0 for v in r["ms"].values())
    # A train step reads x and dy and writes y and dx at least: 4 arrays of x's size.
    itemsize = 4 if r["dtype"] == "float32" else 2
    assert r["bytes_per_element"]["jaxbn train"] >= 4 * itemsize
    assert r["copy_fraction"]["copy"] == pytest.approx(1.0)
    assert r["train_ratio"] == pytest.approx(r["ms"]["jaxbn train"] / r["ms"]["flax train"])
  out = capsys.readouterr().out
  assert out.count("\n| (4, ") == 8 and "device: cpu" in out
  assert (tmp_path / "out.json").stat().st_size > 0
