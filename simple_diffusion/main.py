r"""Trains a diffusion model: a thin absl entry point around train.train_and_evaluate.

  python -m simple_diffusion.main --config=configs/fashion_mnist_demo.py --workdir=workdirs/demo
  python -m simple_diffusion.main --config=configs/imagenet512.py --workdir=gs://bucket/run1 \
      --config.batch_size=256

Re-running the same command on the same workdir resumes. Multi-host: every
process runs the same command; the cluster is detected (Cloud TPU, SLURM, Open
MPI, k8s) or given with --coordinator_address/--num_processes/--process_id.
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
from ml_collections import config_flags

from simple_diffusion import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<name>.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator(
    "workdir", lambda value: value is None or bool(value.strip()),
    message="--workdir is empty: give the run's directory, e.g. --workdir=workdirs/run1 (an "
            "empty value would write the run into the current directory).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Imported after distributed init: nothing may touch the JAX backend before it.
    from simple_diffusion import train  # pylint: disable=g-import-not-at-top
    from simple_diffusion import checkpointing  # pylint: disable=g-import-not-at-top
    from simple_diffusion import config_validation  # pylint: disable=g-import-not-at-top
    from simple_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top
    from simple_diffusion import workdir_lock  # pylint: disable=g-import-not-at-top
    logging.get_absl_handler().addFilter(checkpointing.OrbaxLogFilter())
    from simple_diffusion.evaluation import metrics  # pylint: disable=g-import-not-at-top
    logging.info(distributed.describe())
    expected = (config_validation.ConfigError, checkpointing.IncompatibleCheckpointError,
                checkpointing.CheckpointExistsError, input_pipeline.DatasetNotFoundError,
                workdir_lock.WorkdirLockedError, workdir_lock.WorkdirLockLostError,
                train.NonFiniteLossError, checkpointing.CheckpointWriteError,
                metrics.StatsFileError)
    try:
        if "distill" in _CONFIG.value:  # configs/distill_*.py: progressive distillation.
            from simple_diffusion import distill  # pylint: disable=g-import-not-at-top
            distill.distill(_CONFIG.value, _WORKDIR.value)
        elif "autoencoder" in _CONFIG.value:  # configs/{autoencoder,vae}_*.py (KL autoencoder).
            from simple_diffusion import autoencoder_train  # pylint: disable=g-import-not-at-top
            autoencoder_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        elif "gan" in _CONFIG.value:  # configs/dcgan_*.py: DCGAN (gan_train.py).
            from simple_diffusion import gan_train  # pylint: disable=g-import-not-at-top
            gan_train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        else:
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except expected as e:
        # Expected errors (config, data, checkpoint, workdir, diverged run) end with one
        # line that says what and how to fix it; a traceback would bury it.
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"train: error: {e}")


if __name__ == "__main__":
    app.run(main)
