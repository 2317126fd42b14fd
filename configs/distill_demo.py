r"""Progressive distillation of the Fashion-MNIST demo: 128 DDIM steps -> 64 -> ... -> 8 -> 4.

Needs the demo teacher (configs/fashion_mnist_demo.py trained in workdirs/demo). Run:

  python -m simple_diffusion.distill --config=configs/distill_demo.py --workdir=workdirs/demo_distill
  python -m simple_diffusion.distill --config=configs/distill_demo.py --workdir=workdirs/demo_distill \
      --report --report_out=docs/results/distillation_demo.md

(``python -m simple_diffusion.main`` with this config runs the same rounds.) Five
rounds, each an ordinary run in <workdir>/round_<k>_steps_<N>/ that the sample and
evaluate CLIs read (they sample it with deterministic DDIM, N steps). Re-running
resumes. The rest of the file is the student's run config: the demo recipe, with
the distillation budget below; model, schedule and loss come from the teacher's
config.json. The teacher's guidance w = 1 (the demo's sampling setting) is
distilled into the first student; the students sample unguided.
[project] throughout: 300 optimizer steps per round (a CPU budget; the paper uses
tens of thousands), Adam at a constant 1e-4 without warm-up, EMA 0.995, batch 64.
"""

from simple_diffusion import distill
from simple_diffusion import recipes


def get_config():
    c = recipes.fashion_mnist(recipes.simple_diffusion_imagenet(64), "demo")
    c.schedule.name = "cosine"  # As configs/fashion_mnist_demo.py (the teacher).
    c.num_train_steps = 300     # Optimizer steps per round.
    c.batch_size = 64
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.ema_decays = (0.995,)
    c.sample.every_steps = 0
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    c.distill = distill.default_section()
    c.distill.teacher_workdir = "workdirs/demo"
    c.distill.teacher_num_steps = 128
    c.distill.final_num_steps = 4
    c.distill.guidance_scale = 1.0
    c.distill.report.teacher_steps = (1, 2, 4, 8, 16, 32, 64, 128)
    return c
