r"""Progressive distillation of an ImageNet teacher (the simple diffusion presets).

The teacher workdir is required; the argument picks the teacher's recipe
(resolution 64, 128, 256 or 512 of recipes.simple_diffusion_imagenet, default 64),
whose run fields (batch, mesh/FSDP, data) the students reuse. Every host runs:

  python -m simple_diffusion.distill --config=configs/distill_imagenet.py:256 \
      --workdir=gs://BUCKET/in256_distill --config.distill.teacher_workdir=gs://BUCKET/in256

and ``--report`` on the same command writes the quality/steps table. Rounds:
256 DDIM steps -> 128 -> ... -> 4, each in <workdir>/round_<k>_steps_<N>/.
[project]: 256 teacher steps (the paper starts from 1024-8192), 50K optimizer
steps per round, batch 2048, Adam at a constant 1e-4 with 1K warm-up per round,
EMA 0.9999, no teacher guidance (the students keep the unconditional model
through label dropout and sample with the recipe's guidance).
"""

from simple_diffusion import distill
from simple_diffusion import recipes


def get_config(resolution=None):
    c = recipes.simple_diffusion_imagenet(int(resolution or 64))
    c.num_train_steps = 50_000  # Optimizer steps per round.
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 1000
    c.optimizer.schedule = "constant"
    c.ema_decays = (0.9999,)
    c.sample.every_steps = 0
    c.checkpoint_every_steps = 5000
    c.keep_every_steps = 0
    c.distill = distill.default_section()  # teacher_workdir: set on the command line.
    c.distill.teacher_num_steps = 256
    c.distill.final_num_steps = 4
    c.distill.report.teacher_steps = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    c.distill.report.num_samples = 10_000
    c.distill.report.num_reference = 10_000
    return c
