"""`jaxbn reproduce`: results.json, figures and table from one command; MNIST from user files."""

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxbn
from jaxbn import cli
from jaxbn.reproduce import config as config_lib
from jaxbn.reproduce import figures as figures_lib
from jaxbn.reproduce import report as report_lib
from jaxbn.reproduce import run as run_lib

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

TINY = ["--steps", "4", "--seeds", "0", "--eval-every", "2", "--no-progress"]
RUN_KEYS = {
  "lr",
  "seed",
  "diverged",
  "test_accuracy",
  "percentiles",
  "steps_to_target",
  "accuracy_running_average",
  "accuracy_population",
  "population_accuracy",
}


def _check_network(net, steps, eval_every, n_runs):
  assert net["eval_steps"] == [0, *range(eval_every, steps + 1, eval_every)]
  assert len(net["runs"]) == n_runs
  for run in net["runs"]:
    assert set(run) == RUN_KEYS
    acc = np.array(run["test_accuracy"])
    assert acc.shape == (len(net["eval_steps"]),)
    assert np.all((acc >= 0) & (acc <= 1))
    # The final accuracy is the mean of the last evaluations after step 0 (here at most 5);
    # the target step is the curve's first crossing.
    last = acc[-min(5, len(acc) - 1) :]
    assert run["accuracy_running_average"] == pytest.approx(last.mean(), abs=1e-4)
    hits = [s for s, a in zip(net["eval_steps"], acc, strict=True) if a >= 0.9]
    assert run["steps_to_target"] == (hits[0] if hits else None)
    pct = np.array(run["percentiles"])
    assert pct.shape == (len(net["eval_steps"]), 3)
    assert np.all(pct[:, 0] <= pct[:, 1]) and np.all(pct[:, 1] <= pct[:, 2])
    if net["use_bn"]:
      pop = np.array(run["population_accuracy"])
      assert pop.shape == acc.shape and np.all((pop >= 0) & (pop <= 1))
      assert run["accuracy_population"] == pytest.approx(pop[-len(last) :].mean(), abs=1e-4)
    else:
      assert run["accuracy_population"] is None and run["population_accuracy"] is None


def test_reproduce_on_a_tiny_budget_writes_results_and_figures(tmp_path, capsys):
  out = tmp_path / "out"
  args = ["reproduce", "--out", str(out), *TINY, "--lrs", "0.5", "2", "--activations", "sigmoid"]
  assert cli.main([*args, "--model", "mlp"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert set(results) == {"config", "dataset", "networks", "summary", "claims", "machine"}
  assert [set(c) for c in results["claims"]] == [{"name", "holds", "evidence"}] * 4
  assert results["dataset"] == {
    "name": "digits",
    "train": 1347,
    "test": 450,
    "image_shape": [8, 8, 1],
  }
  assert results["config"]["fig1_lr"] == 2.0
  names = [n["name"] for n in results["networks"]]
  assert names == ["mlp-sigmoid-plain", "mlp-sigmoid-BN"]
  for net in results["networks"]:
    _check_network(net, steps=4, eval_every=2, n_runs=2)
  summary = {(r["network"], r["lr"]): r for r in results["summary"]}
  assert set(summary) == {(n, lr) for n in names for lr in (0.5, 2.0)}
  for (name, lr), row in summary.items():
    runs = [r for n in results["networks"] if n["name"] == name for r in n["runs"] if r["lr"] == lr]
    assert row["accuracy"] == pytest.approx(np.mean([r["accuracy_running_average"] for r in runs]))
  for png in ("fig1a.png", "fig1b.png", "fig1c.png", "fig1.png", "inference.png", "lr_sweep.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "| mlp-sigmoid | 0.5 |" in printed and "| mlp-sigmoid | 2 |" in printed
  assert "Claims, computed from this run's data:" in printed
  assert (out / "report.md").read_text().strip() in printed
  assert "results.json" in printed


def test_vectorized_runs_match_runs_one_by_one():
  # vmap over (lr, seed) runs must give what training each run alone gives.
  ds = config_lib.load_data(config_lib.Config())[0].flat()
  common = dict(steps=6, eval_every=3, batch_size=60, target=0.5, final_evals=2, progress=False)
  net = run_lib._mlp_net(64, "sigmoid", True, 0.05, config_lib.Config().bn_options)
  together = run_lib._train_net(net, ds, (0.5, 2.0), (1,), **common)
  one_by_one = run_lib._train_net(
    dataclasses.replace(net, vectorize=False), ds, (0.5, 2.0), (1,), **common
  )
  for a, b in zip(together["runs"], one_by_one["runs"], strict=True):
    assert (a["lr"], a["seed"]) == (b["lr"], b["seed"])
    np.testing.assert_allclose(a["test_accuracy"], b["test_accuracy"], atol=1e-3)
    np.testing.assert_allclose(a["percentiles"], b["percentiles"], rtol=1e-3, atol=1e-3)
    assert a["accuracy_population"] == pytest.approx(b["accuracy_population"], abs=1e-3)
    np.testing.assert_allclose(a["population_accuracy"], b["population_accuracy"], atol=1e-3)
  # Different rates train differently (the runs are not one run repeated).
  assert together["runs"][0]["percentiles"] != together["runs"][1]["percentiles"]


def _write_mnist_npz(path, n_train=64, n_test=32):
  rng = np.random.default_rng(0)
  np.savez(
    path,
    x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    y_train=rng.integers(0, 10, n_train).astype(np.uint8),
    x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    y_test=rng.integers(0, 10, n_test).astype(np.uint8),
  )


def test_mnist_npz_runs_the_28x28_experiment(tmp_path):
  _write_mnist_npz(tmp_path / "mnist.npz")
  out = tmp_path / "out"
  args = ["reproduce", "--data", str(tmp_path / "mnist.npz"), "--out", str(out), *TINY]
  assert cli.main([*args, "--model", "mlp", "--activations", "sigmoid", "--lrs", "0.1"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["dataset"] == {
    "name": "mnist",
    "train": 64,
    "test": 32,
    "image_shape": [28, 28, 1],
  }
  for net in results["networks"]:
    _check_network(net, steps=4, eval_every=2, n_runs=1)


def test_mnist_idx_files_run_the_cnn(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, 64).astype(np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, 16).astype(np.uint8),
  }
  for name, a in arrays.items():
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    (tmp_path / name).write_bytes(header + a.tobytes())
  out = tmp_path / "out"
  args = ["reproduce", "--dataset", "mnist", "--data", str(tmp_path), "--out", str(out), *TINY]
  assert cli.main([*args, "--model", "cnn", "--cnn-steps", "2", "--cnn-lrs", "0.1"]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["dataset"]["image_shape"] == [28, 28, 1]
  assert [n["name"] for n in results["networks"]] == ["cnn-relu-plain", "cnn-relu-BN"]
  assert (out / "cnn.png").exists()


@pytest.fixture
def no_training(monkeypatch):
  """Makes any training fail the test: the checks under test must come before it."""

  def reproduce(config):
    raise AssertionError("trained before the arguments, data and --out were checked")

  monkeypatch.setattr(run_lib, "reproduce", reproduce)


def _check_one_line_error(err, flag=None):
  # argparse's usage, then exactly one line with the message; no traceback.
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
  if flag is not None:
    assert errors[0].startswith(f"jaxbn reproduce: error: argument {flag}: "), err


@pytest.mark.parametrize(
  ("extra", "message"),
  [
    (["--data", "{tmp}/missing.npz"], r"missing\.npz' does not exist; expected a Keras-layout"),
    (["--data", "{tmp}/bad.npz"], r"cannot read .*bad\.npz' as an \.npz archive"),
    (["--dataset", "mnist"], r"--dataset mnist needs --data PATH"),
    (["--dataset", "digits", "--data", "{tmp}/bad.npz"], r"--data is for --dataset mnist"),
    (["--lrs", "0.1", "-1"], r"lrs must be positive finite learning rates, got \[-1\.0\]"),
    (["--lrs", "0.1", "--fig1-lr", "2"], r"--fig1-lr 2\.0 must be one of --lrs \[0\.1\]"),
    (["--steps", "0"], r"steps must be a positive integer, got 0"),
    (["--eval-every", "0"], r"--eval-every must be a positive integer, got 0"),
    (["--cnn-steps", "0"], r"--cnn-steps must be a positive integer, got 0"),
    (["--cnn-lrs", "inf"], r"--cnn-lrs must be positive finite learning rates, got \[inf\]"),
    (["--seeds", "0", "-1"], r"--seeds must be non-negative integers, got \[-1\]"),
    (["--target", "1.5"], r"--target must be an accuracy in \(0, 1\], got 1\.5"),
    (["--init-std", "0"], r"--init-std must be positive, got 0\.0"),
    (["--momentum", "1"], r"--momentum must be a number in \[0, 1\), got 1\.0"),
    (["--momentum", "-0.5"], r"--momentum must be a number in \[0, 1\), got -0\.5"),
    (["--momentum", "nan"], r"--momentum must be a number in \[0, 1\), got nan"),
    (["--momentum", "high"], r"argument --momentum: invalid float value: 'high'"),
    (["--epsilon", "0"], r"--epsilon must be a positive number, got 0\.0"),
    (["--epsilon", "inf"], r"--epsilon must be a positive number, got inf"),
  ],
)
def test_bad_arguments_and_files_are_clear_errors(tmp_path, capsys, no_training, extra, message):
  (tmp_path / "bad.npz").write_bytes(b"not an archive")
  extra = [a.format(tmp=tmp_path) for a in extra]
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["reproduce", "--out", str(tmp_path / "out"), *extra])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "usage: jaxbn reproduce" in err
  assert re.search(message, err), err
  assert not (tmp_path / "out").exists()
  _check_one_line_error(err)


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib"])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys, missing):
  for name in [n for n in sys.modules if n == missing or n.startswith(missing + ".")] + [missing]:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed (undone after the test)
  monkeypatch.delitem(sys.modules, "jaxbn.reproduce.figures", raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["reproduce", "--quick", "--seeds", "1", "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  _check_one_line_error(err)
  assert (
    err.strip().startswith("jaxbn reproduce: error: ") and "pip install 'jaxbn[reproduce]'" in err
  )


def test_the_command_line_loads_no_framework():
  # `jaxbn --help` stays fast: training, figures and data sets load when a command runs.
  heavy = ("flax", "optax", "matplotlib", "sklearn", "tqdm", "orbax", "equinox", "torch")
  code = f"import sys, jaxbn.cli; print([m for m in {heavy!r} if m in sys.modules])"
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]"


def test_python_dash_m_jaxbn_is_the_command_line():
  proc = subprocess.run(
    [sys.executable, "-m", "jaxbn", "reproduce", "--help"],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert "--data PATH" in proc.stdout and "--no-progress" in proc.stdout


def _write_idx_dir(directory, n_train=64, gz=False):
  rng = np.random.default_rng(1)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, 16).astype(np.uint8),
  }
  for name, a in arrays.items():
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    raw = header + a.tobytes()
    if gz:
      (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
    else:
      (directory / name).write_bytes(raw)


def _truncated_gz(tmp_path):
  _write_idx_dir(tmp_path, gz=True)
  gz = tmp_path / "train-images-idx3-ubyte.gz"
  gz.write_bytes(gz.read_bytes()[:-200])
  return tmp_path


def _npy(tmp_path):
  np.save(tmp_path / "mnist.npy", np.zeros((4, 28, 28), np.uint8))
  return tmp_path / "mnist.npy"


def _npz_without_keys(tmp_path):
  np.savez(tmp_path / "mnist.npz", images=np.zeros((4, 28, 28), np.uint8))
  return tmp_path / "mnist.npz"


def _too_few_examples(tmp_path):
  _write_mnist_npz(tmp_path / "mnist.npz", n_train=10, n_test=8)
  return tmp_path / "mnist.npz"


@pytest.mark.parametrize(
  ("make", "message"),
  [
    (_truncated_gz, r"cannot read .*train-images-idx3-ubyte\.gz' \(Compressed file ended"),
    (_npy, r"mnist\.npy' is a single \.npy array of shape \(4, 28, 28\), not an \.npz archive"),
    (lambda t: t / "missing.npz", r"missing\.npz' does not exist; expected a Keras-layout"),
    (_npz_without_keys, r"lacks the arrays \['x_train', 'y_train', 'x_test', 'y_test'\]"),
    (_too_few_examples, r"holds 10 training examples, fewer than one mini-batch of 60"),
  ],
  ids=["truncated-gz", "npy", "missing", "npz-keys", "too-few-examples"],
)
def test_every_bad_data_file_is_a_one_line_error_naming_data(
  tmp_path, capsys, no_training, make, message
):
  path = make(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["reproduce", "--data", str(path), "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "usage: jaxbn reproduce" in err
  assert re.search(message, err), err
  _check_one_line_error(err, "--data")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_an_unwritable_out_is_a_one_line_error_before_training(
  tmp_path, capsys, no_training, where
):
  (tmp_path / "file").write_text("not a directory")
  out = tmp_path / "file" if where == "a-file" else tmp_path / "file" / "results"
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["reproduce", "--out", str(out), *TINY])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert re.search(r"cannot create or write to '.*file.*' \(Not a directory\)", err)
  _check_one_line_error(err, "--out")


def test_out_is_created_and_probed_before_training_and_the_table_printed_before_files(
  tmp_path, capsys, monkeypatch
):
  out = tmp_path / "new" / "out"
  events = []

  def reproduce(config):
    # --out exists already, and the probe file is gone.
    events.append(("train", sorted(os.listdir(out))))
    ds = {"name": "digits", "train": 1347, "test": 450, "image_shape": [8, 8, 1]}
    return {"dataset": ds}

  def write(kind):
    def writer(results, directory):
      events.append((kind, capsys.readouterr().out))
      return os.path.join(directory, kind)

    return writer

  monkeypatch.setattr(run_lib, "reproduce", reproduce)
  monkeypatch.setattr(cli, "format_report", lambda results: "THE TABLE")
  monkeypatch.setattr(cli, "write_results", write("results.json"))
  monkeypatch.setattr(cli, "write_report", lambda report, directory: report)
  monkeypatch.setattr(figures_lib, "write_figures", lambda r, d: [write("fig1.png")(r, d)])
  assert cli.main(["reproduce", "--out", str(out), *TINY]) == 0
  assert events[0] == ("train", [])
  assert events[1][0] == "results.json" and "THE TABLE" in events[1][1]
  assert events[2] == ("fig1.png", "")
  assert "wrote" in capsys.readouterr().out


def test_help_documents_every_flag_and_each_default_once(capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "100")
  _, sub = cli._parser()
  for action in sub._actions:
    assert action.help, action.option_strings
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["reproduce", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out.split("options:")[1]
  # One block per option: its flag line and the indented lines of its help.
  blocks = re.split(r"\n(?=  -)", text.strip("\n"))
  assert len(blocks) == len(sub._actions)
  for block in blocks:
    flag, _, help_text = block.strip().partition(" ")
    assert help_text.strip(), f"{flag} has no help"
    assert block.count("default") <= 1, block
  assert "(default: None)" not in text and "(default: False)" not in text
  flat = " ".join(text.split())
  assert "(default: 0.01 0.1 0.5 2 5)" in flat and "(default: both; --quick: mlp)" in flat


def test_momentum_and_epsilon_default_to_bnoptions_and_reach_the_config(monkeypatch, tmp_path):
  seen = []

  def reproduce(config):
    seen.append(config)
    raise KeyboardInterrupt  # stop before the report and figures

  monkeypatch.setattr(run_lib, "reproduce", reproduce)
  for extra in ([], ["--quick"], ["--momentum", "0.9", "--epsilon", "1e-3"]):
    with pytest.raises(KeyboardInterrupt):
      cli.main(["reproduce", "--out", str(tmp_path), *TINY, *extra])
  default, quick, given = seen
  defaults = jaxbn.BNOptions()
  assert (default.momentum, default.epsilon) == (defaults.momentum, defaults.epsilon)
  assert default.bn_options == quick.bn_options == defaults
  assert given.bn_options == jaxbn.BNOptions(momentum=0.9, epsilon=1e-3)


def test_the_mlp_of_a_run_trains_with_the_configured_momentum():
  # momentum 0: the running statistics after one step are the batch's (float64 reference).
  net = run_lib._mlp_net(4, "sigmoid", True, 0.05, jaxbn.BNOptions(momentum=0.0))
  params, state = net.init(jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  _, state, _ = net.apply(params, state, x, train=True)
  z = x.astype(np.float64) @ np.asarray(params["hidden"][0]["kernel"], np.float64)
  tol = 8 * np.finfo(np.float32).eps * np.abs(z).max()
  np.testing.assert_allclose(state[0].mean, z.mean(0), atol=tol)
  np.testing.assert_allclose(state[0].var, z.var(0), atol=tol * np.abs(z).max())


def test_momentum_and_epsilon_reach_the_runs_and_the_report(tmp_path, monkeypatch, capsys):
  given = []
  mlp_net = run_lib._mlp_net

  def recording(*args):
    given.append(args[-1])
    return mlp_net(*args)

  monkeypatch.setattr(run_lib, "_mlp_net", recording)
  out = tmp_path / "out"
  flags = ["--momentum", "0.5", "--epsilon", "0.001", "--model", "mlp", "--activations", "sigmoid"]
  assert cli.main(["reproduce", "--out", str(out), *TINY, "--lrs", "0.5", *flags]) == 0
  assert given == [jaxbn.BNOptions(momentum=0.5, epsilon=0.001)] * 2  # without and with BN
  results = json.loads((out / "results.json").read_text())
  assert (results["config"]["momentum"], results["config"]["epsilon"]) == (0.5, 0.001)
  report = (out / "report.md").read_text()
  assert "evaluated every 2 steps; batch norm with momentum 0.5 and epsilon 0.001." in report
  assert report.startswith("Output of a custom run on ")


def test_a_record_without_momentum_and_epsilon_ran_with_the_defaults():
  # Records written before --momentum and --epsilon existed report as they did.
  config = dataclasses.asdict(config_lib.Config.quick())
  record = json.loads(
    json.dumps({k: v for k, v in config.items() if k not in ("momentum", "epsilon")})
  )
  assert config_lib.Config.from_record(record) == config_lib.Config.quick()
  assert report_lib.run_kind(record) == "jaxbn reproduce --quick"
  changed = {**record, "momentum": 0.9}
  assert report_lib.run_kind(changed) == "a custom configuration"
