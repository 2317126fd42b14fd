r"""One run of an ablation suite (simple_diffusion/experiments/suites.py) as a config.

The suite runner trains these itself; this file reproduces or extends a single run:

  python -m simple_diffusion.main --config=configs/experiment.py:shift128,shift64,cpu \
      --config.seed=1 --workdir=workdirs/shift64_seed1

The argument is "<suite>,<arm>[,<scale>]" (scale 'cpu' by default, or 'full').
"""

from simple_diffusion.experiments import suites


def get_config(arg: str = "weighting,eps_mse,cpu"):
    parts = arg.split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"configs/experiment.py:{arg}: use <suite>,<arm>[,<scale>].")
    suite = suites.get_suite(parts[0])
    if suite.kind != "training":
        raise ValueError(f"suite {suite.name!r} samples the models of suite "
                         f"{suite.source[0]!r}; give one of that suite's arms instead.")
    arms = {a.name: a for a in suite.arms}
    if parts[1] not in arms:
        raise ValueError(f"suite {suite.name!r} has no arm {parts[1]!r}; use one of "
                         f"{sorted(arms)}.")
    return suites.run_config(suite, arms[parts[1]], 0, parts[2] if len(parts) == 3 else "cpu")
