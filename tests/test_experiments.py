"""The ablation-suite machinery: a tiny suite trains, evaluates, resumes, skips and reports.

The real suites (simple_diffusion/experiments/suites.py) are checked for valid configs;
the runner is exercised end to end on a two-arm suite of the tiny model.
"""

import json
import os

import numpy as np
import pytest

from simple_diffusion import config_validation
from simple_diffusion import samplers
from simple_diffusion import schedules
from simple_diffusion import train
from simple_diffusion.experiments import report
from simple_diffusion.experiments import runner
from simple_diffusion.experiments import suites as suites_lib

from conftest import load_config  # pylint: disable=g-bad-import-order

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("experiments")


def test_every_suite_arm_is_a_valid_config_at_every_scale():
    for suite in suites_lib.SUITES.values():
        if suite.kind != "training":
            continue
        for arm in suite.arms:
            for scale in suites_lib.SCALES:
                c = suites_lib.run_config(suite, arm, 1, scale)
                config_validation.validate_config(c, num_devices=8, process_count=1)
                assert c.seed == 1 and c.num_train_steps == suite.budgets[scale].train_steps
                # One protocol for every arm: the suite's sampler, unguided.
                assert c.eval.sampler == suite.protocol.sampler
                assert c.eval.num_steps == suite.protocol.num_steps
                assert c.eval.guidance_scale == 0.0


def test_shared_arms_are_identical_runs():
    """Suites that name the same arm of the same base must mean the same run."""
    seen = {}
    for suite in suites_lib.SUITES.values():
        if suite.kind != "training":
            continue
        for arm in suite.arms:
            key = (suite.base, arm.name)
            if key in seen:
                assert seen[key] == (arm.overrides, suite.budgets, suite.protocol), key
            seen[key] = (arm.overrides, suite.budgets, suite.protocol)


def test_matched_nfe_resolution_is_the_largest_that_fits():
    c = suites_lib.run_config(suites_lib.get_suite("weighting"),
                              suites_lib.get_suite("weighting").arms[0], 0, "cpu")
    logsnr_fn = schedules.from_config(c.schedule)
    checked = ("ddpm_8", "heun_16", "ddpm_cfg_16", "ddpm_cfg_interval_16", "ddpm_cfg_interval_32")
    for arm in suites_lib.get_suite("sampling").arms:
        if arm.name not in checked:  # Grids cost ~0.1 s each: a representative subset.
            continue
        options = suites_lib.sampler_options(arm, lambda o: samplers.logsnr_grid(o, logsnr_fn))
        target = arm.overrides["target_nfe"]

        def nfe(steps):  # Independent count: 2 evaluations where guidance is on.
            o = samplers.SamplerOptions(**{**options.__dict__, "num_steps": steps})
            grid = np.asarray(samplers.logsnr_grid(o, logsnr_fn), np.float64)
            points = list(grid[:-1]) + (list(grid[1:-1]) if o.sampler == "heun" else [])
            if not o.guided:
                return len(points)
            low, high = o.guidance_logsnr_min, o.guidance_logsnr_max  # ±inf: everywhere.
            return sum(2 if low <= p <= high else 1 for p in points)

        assert nfe(options.num_steps) <= target, arm.name
        if arm.overrides["num_steps"] is None:  # Resolved: one more step would not fit.
            assert nfe(options.num_steps + 1) > target, arm.name
        else:
            assert nfe(options.num_steps) >= target - 1, arm.name  # Heun: 2N - 1.


def _tiny_base(data_dir):
    def base():
        c = load_config("tiny")
        c.data.data_dir = data_dir
        c.ema_decays = (0.9,)
        return c
    return base


@pytest.fixture(scope="module")
def tiny_suites(tmp_path_factory, fashion_mnist_dir):
    """A two-arm, two-seed training suite and a sampling suite on its first arm, run once."""
    mp = pytest.MonkeyPatch()
    budget = {"cpu": suites_lib.Budget(train_steps=4, batch_size=16, num_samples=16,
                                       num_reference=24, eval_every=0)}
    training = suites_lib.Suite(
        name="tiny_schedule", title="tiny", claim="c", expected_best="shifted", caveat="tiny",
        base="tiny_test",
        arms=(suites_lib.Arm("cosine", "cosine", {"schedule.name": "cosine"}),
              suites_lib.Arm("shifted", "shifted", {"schedule.name": "cosine_shifted"})),
        budgets=budget, protocol=samplers.SamplerOptions(sampler="ddim", num_steps=2),
        seeds=(0,))
    sampling = suites_lib.Suite(
        name="tiny_sampling", title="tiny sampling", claim="c", expected_best=None,
        caveat="tiny", base="tiny_test",
        arms=(suites_lib.Arm("ddim_2", "ddim", dict(sampler="ddim", num_steps=2, target_nfe=2)),
              suites_lib.Arm("ddpm_cfg_interval_4", "interval", dict(
                  sampler="ddpm", num_steps=None, guidance_scale=1.0, guidance_logsnr_min=-2.0,
                  guidance_logsnr_max=2.0, target_nfe=4))),
        budgets=budget, protocol=samplers.SamplerOptions(sampler="ddim", num_steps=2),
        seeds=(0,), source=("tiny_schedule", "cosine"))
    mp.setitem(suites_lib.BASES, "tiny_test", _tiny_base(fashion_mnist_dir))
    mp.setitem(suites_lib.SUITES, "tiny_schedule", training)
    mp.setitem(suites_lib.SUITES, "tiny_sampling", sampling)
    root = str(tmp_path_factory.mktemp("experiments"))
    results = {s.name: runner.run_suite(s, "cpu", root) for s in (training, sampling)}
    yield training, sampling, root, results
    mp.undo()


def test_training_suite_records_every_run(tiny_suites):
    training, _, root, results = tiny_suites
    for arm in training.arms:
        for seed in training.seeds:
            rec = results["tiny_schedule"]["records"][arm.name][seed]
            assert rec["seed"] == seed and rec["arm"] == arm.name
            path = runner.run_dir(root, training, arm, seed, "cpu")
            config = json.loads(open(os.path.join(path, "config.json")).read())
            assert config["seed"] == seed
            assert config["schedule"]["name"] == arm.overrides["schedule.name"]
            # Evaluated at every eval_every steps and at the end, with the suite's protocol.
            assert sorted(rec["evals"]) == ["4"]
            assert np.isfinite(rec["final"]["fd_effnet_lite0"])
            assert [s for s, _ in rec["loss"]] == [5] or [s for s, _ in rec["loss"]] == [4]
            assert os.path.exists(rec["grid"])
            assert rec["train_flops_per_image"] > 0 and rec["params"] > 0
    # Different seeds and schedules give different models, so different scores.
    finals = {(a, s): r["final"]["fd_effnet_lite0"]
              for a, by_seed in results["tiny_schedule"]["records"].items()
              for s, r in by_seed.items()}
    assert len(set(finals.values())) == len(finals)


def test_finished_runs_are_skipped(tiny_suites, monkeypatch):
    training, sampling, root, results = tiny_suites

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "train_and_evaluate", fail)
    again = runner.run_suite(training, "cpu", root)
    as_json = lambda records: json.dumps(records, sort_keys=True)  # Tuples read back as lists.
    assert as_json(again["records"]) == as_json(results["tiny_schedule"]["records"])
    again = runner.run_suite(sampling, "cpu", root)
    assert (again["records"]["ddim_2"][0]["final"]
            == results["tiny_sampling"]["records"]["ddim_2"][0]["final"])


def test_changed_suite_definition_refuses_the_old_run(tiny_suites):
    training, _, root, _ = tiny_suites
    changed = suites_lib.Arm("cosine", "cosine", {"schedule.name": "cosine",
                                                  "loss.weighting": "v_mse"})
    with pytest.raises(ValueError, match="holds a different run"):
        runner.train_run(training, changed, 0, "cpu", root)


def test_changed_base_config_refuses_the_old_run(tiny_suites, monkeypatch):
    """Same arm and budget, but the base's model changed: the old run is not reused."""
    training, _, root, _ = tiny_suites
    wider = _tiny_base(suites_lib.BASES["tiny_test"]().data.data_dir)

    def base():
        c = wider()
        c.model.transformer_width *= 2
        return c

    monkeypatch.setitem(suites_lib.BASES, "tiny_test", base)
    with pytest.raises(ValueError, match="holds a different run"):
        runner.train_run(training, training.arms[0], 0, "cpu", root)


def test_sampling_suite_matches_evaluations(tiny_suites):
    _, sampling, _, results = tiny_suites
    recs = results["tiny_sampling"]["records"]
    assert recs["ddim_2"][0]["nfe"] == 2
    interval = recs["ddpm_cfg_interval_4"][0]
    assert interval["nfe"] <= 4 and interval["options"]["num_steps"] >= 2
    assert interval["model"] == "tiny_test__cosine__seed0"
    assert os.path.exists(interval["grid"]) and interval["seconds_per_image"] > 0


def test_report_writes_tables_plots_and_index(tiny_suites, tmp_path):
    training, sampling, _, results = tiny_suites
    for suite in (training, sampling):
        summary = report.summarize(suite, results[suite.name], scale="cpu", command="cmd")
        text = report.write_suite(summary, str(tmp_path))
        for arm in suite.arms:
            assert f"`{arm.name}`" in text or f"`{arm.name.rsplit('_', 1)[0]}`" in text
        for name in summary_figures(tmp_path, suite.name):
            assert os.path.getsize(tmp_path / name) > 1000
    report.write_index(str(tmp_path))
    index = (tmp_path / "README.md").read_text()
    assert "tiny" in index and "Not run yet" in index


def summary_figures(directory, name):
    return json.loads((directory / f"{name}.json").read_text())["figures"].values()


def _arm(name, values):
    return dict(name=name, fd=report._stats(values))  # pylint: disable=protected-access


@pytest.mark.parametrize("values,expected", [
    ({"a": [10, 11], "b": [5, 6]}, "agrees with the paper"),        # b best, separated.
    ({"a": [10, 11], "b": [9, 10.5]}, "without settling it"),       # b best, overlapping.
    ({"a": [5, 6], "b": [10, 11]}, "a disagreement"),               # a best, separated.
    ({"a": [9, 10.5], "b": [10, 11]}, "inside the noise, so no disagreement"),
    ({"a": [9, 10.5], "c": [10, 11]}, "`b` has not finished yet"),  # A partial report.
])
def test_verdict_against_hand_made_numbers(values, expected):
    suite = suites_lib.Suite(name="s", title="t", claim="c", expected_best="b", caveat="",
                             base="demo32", arms=(), budgets={}, protocol=None)
    summary = {"arms": [_arm(k, v) for k, v in values.items()]}
    assert expected in report.verdict(suite, summary)


def test_verdict_reports_class_accuracy_ranking():
    suite = suites_lib.Suite(name="s", title="t", claim="c", expected_best=None, caveat="",
                             base="demo32", arms=(), budgets={}, protocol=None)

    def arm(name, fd, accuracy):
        return dict(_arm(name, fd), accuracy=report._stats(accuracy))  # pylint: disable=protected-access

    clear = report.verdict(suite, {"arms": [arm("a", [10, 11], [0.2, 0.3]),
                                            arm("b", [10, 12], [0.5, 0.6])]})
    assert "`b` is highest (0.550), clear of every other arm's seed range" in clear
    close = report.verdict(suite, {"arms": [arm("a", [10, 11], [0.2, 0.5]),
                                            arm("b", [10, 12], [0.4, 0.6])]})
    assert "`b` is highest (0.500), inside the noise of `a` (0.350)" in close


def test_sampling_verdict_against_hand_made_numbers():
    def arm(name, nfe, values):
        return dict(_arm(name, values), target_nfe=nfe)

    arms = [arm("ddpm_8", 8, [10, 11]), arm("ddim_8", 8, [5, 6]), arm("heun_8", 8, [7, 8]),
            arm("ddpm_16", 16, [6, 7]), arm("ddim_16", 16, [6.5, 7.5]),
            arm("ddpm_cfg_16", 16, [9, 10]), arm("ddpm_cfg_interval_16", 16, [7, 8])]
    text = report._sampling_verdict(arms)  # pylint: disable=protected-access
    assert "(`ddim_8`, 5.5) beats DDPM (10.5)" in text
    assert "(`ddim_16`, 7.0) is inside the noise of DDPM (6.5)" in text
    assert "at 16 evaluations better than guidance everywhere (7.5 vs 9.5)" in text
    assert "fewer evaluations holds here" in text and "as good as guidance everywhere" in text


def test_partial_report_lists_missing_runs(tmp_path):
    suite = suites_lib.get_suite("multiscale128")
    run = runner.run_suite(suite, "cpu", str(tmp_path / "root"), finished_only=True)
    assert run["missing"] == [f"{a.name} seed {s}" for a in suite.arms for s in suite.seeds]
    assert not os.path.exists(tmp_path / "root" / "runs")  # Nothing was trained.
    summary = report.summarize(suite, run, scale="cpu", command="cmd")
    assert summary["arms"] == [] and "nothing to compare" in summary["verdict"]
    text = report.suite_markdown(summary, {})
    assert "**Partial report**: 4 runs had not finished" in text
