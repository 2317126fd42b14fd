"""Benchmark measurements; ``python -m simple_diffusion.benchmark`` is the entry point.

  timing.py  device description, matmul peak, wall/CPU timers, memory analyses.
  train.py   the trainer's train step: compile, step time, memory, forward/backward.
  sample.py  the sampler: time per step, overhead beyond the network calls.
  gpu.py     the first-GPU run: largest batch that fits, FSDP vs data mesh, sampling.
  report.py  Markdown tables of the results.

FLOPs (correct for scanned and rematerialised models) come from
``simple_diffusion.flops``.
"""
