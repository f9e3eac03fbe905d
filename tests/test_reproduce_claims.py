"""The claims of `jaxbn reproduce`: each verdict from hand-made records, then a real quick run."""

import gzip
import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from jaxbn import cli
from jaxbn.reproduce import claims as claims_lib
from jaxbn.reproduce import report as report_lib
from jaxbn.reproduce.config import Config

_spec = importlib.util.spec_from_file_location(
  "reproduction_results",
  pathlib.Path(__file__).resolve().parents[1] / "scripts" / "reproduction_results.py",
)
reproduction_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduction_results)

STEPS = [0, 50, 100, 150, 200]


def _run(lr, seed, acc, pct=None, pop=None):
  """One run's record: an accuracy curve, percentile curves, population accuracies."""
  pct = [[-1.0, 0.0, 1.0]] * len(STEPS) if pct is None else pct
  hit = [s for s, a in zip(STEPS, acc, strict=True) if a >= 0.9]
  return {
    "lr": lr,
    "seed": seed,
    "diverged": False,
    "test_accuracy": acc,
    "percentiles": pct,
    "population_accuracy": pop,
    "steps_to_target": hit[0] if hit else None,
    "accuracy_running_average": float(np.mean(acc[-2:])),
    "accuracy_population": None if pop is None else float(np.mean(pop[-2:])),
  }


def _results(networks, fig1_lr=2.0):
  config = {**Config(steps=200, eval_every=50, final_evals=2).__dict__, "fig1_lr": fig1_lr}
  config["seeds"] = [0, 1, 2]
  dataset = {"name": "digits", "train": 1347, "test": 450, "image_shape": [8, 8, 1]}
  results = {"config": config, "dataset": dataset, "networks": networks}
  results["summary"] = report_lib.summarize(results)
  return results


def _net(name, runs):
  return {"name": name, "use_bn": name.endswith("-BN"), "eval_steps": STEPS, "runs": runs}


SLOW = [0.1, 0.3, 0.6, 0.92, 0.95]  # passes 90% at step 150
FAST = [0.1, 0.92, 0.95, 0.96, 0.97]  # at step 50
NEVER = [0.1, 0.1, 0.1, 0.1, 0.1]
POP = [0.1, 0.95, 0.96, 0.97, 0.97]


def _pair(plain_curves, bn_curves, lrs=(2.0,), name="mlp-sigmoid", pop=POP):
  plain = [
    _run(lr, s, c) for lr, cs in zip(lrs, plain_curves, strict=True) for s, c in enumerate(cs)
  ]
  bn = [
    _run(lr, s, c, pop=pop) for lr, cs in zip(lrs, bn_curves, strict=True) for s, c in enumerate(cs)
  ]
  return [_net(f"{name}-plain", plain), _net(f"{name}-BN", bn)]


def test_faster_holds_when_bn_passes_first_at_every_rate_and_counts_never_as_slower():
  results = _results(_pair([[SLOW] * 3, [NEVER] * 3], [[FAST] * 3, [FAST] * 3], lrs=(2.0, 0.1)))
  claim = claims_lib.faster(results)
  assert claim["holds"], claim
  assert "lr 2: plain 150 steps, BN 50 steps" in claim["evidence"]
  assert "lr 0.1: plain never, BN 50 steps" in claim["evidence"]


def test_faster_fails_when_plain_passes_first_at_one_rate_or_nobody_passes():
  results = _results(_pair([[FAST] * 3, [SLOW] * 3], [[SLOW] * 3, [FAST] * 3], lrs=(2.0, 0.1)))
  assert not claims_lib.faster(results)["holds"]
  nobody = claims_lib.faster(_results(_pair([[NEVER] * 3], [[NEVER] * 3])))
  assert not nobody["holds"] and "no rate where either network passes" in nobody["evidence"]


def test_a_row_passes_when_most_seeds_do_the_median_counting_never_as_infinite():
  # Two of three seeds pass: the median is the slower of the two.
  results = _results(_pair([[NEVER, NEVER, SLOW]], [[FAST, SLOW, NEVER]]))
  rows = {r["network"]: r for r in results["summary"]}
  assert rows["mlp-sigmoid-BN"]["steps_to_target"] == 150
  assert rows["mlp-sigmoid-BN"]["reached_target"] == 2
  assert rows["mlp-sigmoid-plain"]["steps_to_target"] is None
  claim = claims_lib.higher_rates(results)
  assert claim["holds"] and "BN trains, plain fails: mlp-sigmoid at lr 2" in claim["evidence"]


def test_higher_rates_fails_when_bn_loses_a_rate_the_plain_network_trains_at():
  networks = _pair([[NEVER] * 3], [[FAST] * 3]) + _pair(
    [[FAST] * 3], [[NEVER] * 3], name="mlp-relu", pop=NEVER
  )
  claim = claims_lib.higher_rates(_results(networks))
  assert not claim["holds"]
  assert "plain trains, BN fails: mlp-relu at lr 2" in claim["evidence"]


def test_drift_is_the_range_of_each_percentile_averaged_over_the_three():
  pct = [[-1, 0, 1], [-3, 0, 2], [-2, 1, 1], [-2, 0, 1], [-1, 0, 1]]  # ranges 2, 1, 1
  assert claims_lib.drift({"percentiles": pct}) == pytest.approx(4 / 3)
  pct[2] = [None, 0, 1]  # a non-finite value was recorded
  assert math.isnan(claims_lib.drift({"percentiles": pct}))


def test_stable_inputs_compares_the_drift_at_the_figure_1_rate():
  moving = [[-1, 0, 1], [-5, -4, -3], [-6, -2, 0], [-6, -2, 1], [-7, -2, 1]]
  steady = [[-1, 0, 1], [-2, -1, 1], [-2, -1, 1], [-2, -1, 1], [-2, -1, 1]]

  def networks(plain_pct, bn_pct):
    plain = [_run(2.0, s, SLOW, plain_pct) for s in range(3)]
    bn = [_run(2.0, s, FAST, bn_pct, POP) for s in range(3)]
    return [_net("mlp-sigmoid-plain", plain), _net("mlp-sigmoid-BN", bn)]

  claim = claims_lib.stable_inputs(_results(networks(moving, steady)))
  assert claim["holds"] and "plain 4.67, BN 0.67"  # (6+4+4)/3, (1+1+0)/3 in claim["evidence"]
  assert not claims_lib.stable_inputs(_results(networks(steady, moving)))["holds"]


def test_population_statistics_must_match_at_the_end_and_win_at_the_first_evaluation():
  pop = [0.1, 0.9, 0.9, 0.93, 0.94]  # far above SLOW at step 50, 0.935 at the end as SLOW
  claim = claims_lib.population_statistics(_results(_pair([[NEVER] * 3], [[SLOW] * 3], pop=pop)))
  assert claim["holds"] and "at step 50: mlp-sigmoid lr 2: 0.900 vs 0.300" in claim["evidence"]
  # Population accuracy 0.065 above the running averages at the end, beyond two standard
  # errors (0.023 at 0.935 on 450 images): no match.
  off = [0.1, 0.95, 0.96, 1.0, 1.0]
  claim = claims_lib.population_statistics(_results(_pair([[NEVER] * 3], [[SLOW] * 3], pop=off)))
  assert not claim["holds"] and "1.000 vs 0.935 (±0.023)" in claim["evidence"]
  # Running averages as good as population statistics early on: no early win.
  same = claims_lib.population_statistics(_results(_pair([[NEVER] * 3], [[FAST] * 3], pop=FAST)))
  assert not same["holds"]


@pytest.mark.slow
def test_quick_run_claims_hold_and_its_report_is_what_it_prints(tmp_path, capsys):
  out = tmp_path / "quick"
  assert cli.main(["reproduce", "--quick", "--out", str(out), "--no-progress"]) == 0
  results = json.loads((out / "results.json").read_text())
  claims = results["claims"]
  assert [set(c) for c in claims] == [{"name", "holds", "evidence"}] * 4
  assert all(c["holds"] for c in claims), json.dumps(claims, indent=1)
  assert {"cpu", "cores", "devices", "python", "packages", "wall_time_s"} <= set(results["machine"])
  report = (out / "report.md").read_text().strip()
  assert report == report_lib.format_report(results)
  assert report.startswith("Output of `jaxbn reproduce --quick` on ")
  assert report in capsys.readouterr().out
  assert report.count("**holds**") == 4


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["full", "quick"])
def test_the_reproduction_page_is_the_commands_report_of_a_stored_run(kind):
  # docs/reproduction.md's results are `jaxbn reproduce`'s own report of the run stored
  # in docs/ (scripts/reproduction_results.py), and that run's summary and claims are
  # what its data give.
  results = json.loads(gzip.decompress((ROOT / "docs" / f"reproduce-{kind}.json.gz").read_bytes()))
  command = "jaxbn reproduce" + (" --quick" if kind == "quick" else "")
  assert report_lib.run_kind(results["config"]) == command
  assert report_lib.summarize(results) == results["summary"]
  assert claims_lib.check_claims(results) == results["claims"]
  assert all(c["holds"] for c in results["claims"])
  match = reproduction_results.block(kind).search(reproduction_results.PAGE.read_text())
  assert match is not None, f"docs/reproduction.md has no {kind} results block"
  assert match.group(2) == report_lib.format_report(results)
