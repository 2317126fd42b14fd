r"""Runs ablation suites and writes their tables and plots into docs/results/.

  python -m simple_diffusion.experiments --suite=shift128 --workdir=experiments/
  python -m simple_diffusion.experiments --suite=all --workdir=experiments/
  python -m simple_diffusion.experiments --suite=weighting --scale=full --workdir=gs://b/exp
  python -m simple_diffusion.experiments --suite=shift128 --finished_only  # partial tables
  python -m simple_diffusion.experiments --report_only   # rebuild docs/results/README.md

Suites (simple_diffusion/experiments/suites.py): shift128, multiscale128, weighting,
architecture, sampling. Re-running resumes interrupted runs and skips finished ones.
"""

from simple_diffusion import cli_start

if __name__ == "__main__":
    # Before the imports below: it may restart the process (execve), which would
    # otherwise redo them (~2 s of jax, flax and TensorFlow imports per command).
    cli_start.prepare_process()

# pylint: disable=g-import-not-at-top,wrong-import-position
import sys

from absl import app
from absl import flags
from absl import logging

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import input_pipeline
from simple_diffusion import workdir_lock
from simple_diffusion.experiments import report
from simple_diffusion.experiments import runner
from simple_diffusion.experiments import suites as suites_lib

_SUITE = flags.DEFINE_string("suite", None, "A suite name, a comma-separated list, or 'all'.")
_WORKDIR = flags.DEFINE_string("workdir", "experiments", "Root of the suites' run directories.")
_SCALE = flags.DEFINE_enum("scale", "cpu", list(suites_lib.SCALES),
                           "Budget: 'cpu' (minutes on 2 cores) or 'full' (an accelerator).")
_OUTPUT = flags.DEFINE_string("output", "docs/results", "Where tables and plots are written.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only rebuild <output>/README.md from the suite JSONs.")
_FINISHED_ONLY = flags.DEFINE_bool(
    "finished_only", False, "Train nothing: report the suite's finished runs, listing the "
    "missing ones (e.g. while the suite still runs elsewhere).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _REPORT_ONLY.value:
        report.write_index(_OUTPUT.value)
        return
    if not _SUITE.value:
        sys.exit(f"experiments: error: give --suite, one of {sorted(suites_lib.SUITES)} or all.")
    names = list(suites_lib.SUITES) if _SUITE.value == "all" else _SUITE.value.split(",")
    expected = (ValueError, config_validation.ConfigError,
                checkpointing.IncompatibleCheckpointError, input_pipeline.DatasetNotFoundError,
                workdir_lock.WorkdirLockedError)
    try:
        suites = [suites_lib.get_suite(n) for n in names]  # Unknown names fail before work.
        for suite in suites:
            result = runner.run_suite(suite, _SCALE.value, _WORKDIR.value,
                                      finished_only=_FINISHED_ONLY.value)
            command = ("python -m simple_diffusion.experiments "
                       f"--suite={suite.name} --workdir={_WORKDIR.value}"
                       + ("" if _SCALE.value == "cpu" else f" --scale={_SCALE.value}"))
            summary = report.summarize(suite, result, scale=_SCALE.value, command=command)
            report.write_suite(summary, _OUTPUT.value)
            report.write_index(_OUTPUT.value)
            logging.info("%s: %s", suite.name, summary["verdict"])
            print(f"{suite.name}: {summary['verdict']}")
    except expected as e:
        sys.exit(f"experiments: error: {e}")


if __name__ == "__main__":
    app.run(main)
