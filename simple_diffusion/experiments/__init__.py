"""Ablation suites of the papers' claims: definitions, runner and generated reports.

  python -m simple_diffusion.experiments --suite=shift128 --workdir=experiments/

See ``suites`` for what each suite varies and ``docs/results/README.md`` for results.
"""
