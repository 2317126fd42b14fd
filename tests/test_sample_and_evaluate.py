"""The sampling CLI and the evaluation on the tiny run's checkpoint."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from simple_diffusion import checkpointing
from simple_diffusion import models
from simple_diffusion import sampling
from simple_diffusion import sharding
from simple_diffusion import train_step as train_step_lib
from simple_diffusion.evaluation import evaluator as evaluator_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _sample_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "simple_diffusion.sample", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sample_cli_writes_its_files_deterministically(tiny_run, tmp_path):
    workdir, _ = tiny_run
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = _sample_cli(f"--workdir={workdir}", "--num_samples=10", "--sampler=ddim",
                           "--steps=3", "--labels=3,7", "--seed=5", "--guidance=1.5",
                           f"--output_dir={out}")
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(out)
    files = sorted(os.listdir(outs[0]))
    assert "grid.png" in files and "samples.npz" in files
    pngs = [f for f in files if f.endswith(".png") and f != "grid.png"]
    assert len(pngs) == 10
    with np.load(outs[0] / "samples.npz") as a, np.load(outs[1] / "samples.npz") as b:
        assert a["images"].shape == (10, 32, 32, 1) and a["images"].dtype == np.uint8
        np.testing.assert_array_equal(a["labels"], [3, 7] * 5)
        np.testing.assert_array_equal(a["images"], b["images"])
        # The PNG files hold exactly the arrays.
        first = np.asarray(Image.open(outs[0] / sorted(pngs)[0]))
        np.testing.assert_array_equal(first, a["images"][0, ..., 0])
        # Samples differ from each other (not a constant image).
        assert a["images"].std() > 1.0


def test_sample_cli_rejects_bad_arguments(tiny_run, tmp_path):
    workdir, _ = tiny_run
    done = _sample_cli(f"--workdir={workdir}", "--sampler=dpm++", f"--output_dir={tmp_path}")
    assert done.returncode != 0 and "should be one of" in done.stderr
    # Values that used to write all-black images and exit 0: one line, no traceback.
    for flag, field in [("--eta=-5", "eta"), ("--guidance=nan", "guidance_scale"),
                        ("--num_samples=0", "num_samples"), ("--batch_size=-1", "batch_size")]:
        done = _sample_cli(f"--workdir={workdir}", "--sampler=ddim", flag,
                           f"--output_dir={tmp_path}")
        assert done.returncode != 0 and field in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
    done = _sample_cli(f"--workdir={workdir}", "--labels=10", f"--output_dir={tmp_path}")
    assert done.returncode != 0 and "class ids must be in [0, 9]" in done.stderr
    done = _sample_cli(f"--workdir={tmp_path}")
    assert done.returncode != 0 and "not a training workdir" in done.stderr
    done = _sample_cli(f"--workdir={workdir}", "--step=7")
    assert done.returncode != 0 and "available: [10, 20]" in done.stderr


def test_sample_cli_takes_every_sampler_option(tiny_run, tmp_path):
    workdir, _ = tiny_run
    done = _sample_cli(f"--workdir={workdir}", "--num_samples=8", "--sampler=heun", "--steps=3",
                       "--guidance=1.0", "--guidance_logsnr_min=-2", "--guidance_logsnr_max=2.5",
                       "--s_churn=1", "--sigma_max=50", "--clip_x=true",
                       f"--output_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "sampler.json").read_text())
    assert record["sampler"] == "heun" and record["num_steps"] == 3
    assert (record["guidance_logsnr_min"], record["guidance_logsnr_max"]) == (-2.0, 2.5)
    assert record["sigma_max"] == 50.0 and record["clip_x"] is True and record["s_churn"] == 1.0
    assert "images/s" in done.stderr  # The progress line.
    with np.load(tmp_path / "samples.npz") as f:
        assert f["images"].shape == (8, 32, 32, 1) and f["images"].std() > 1.0


def test_parse_labels():
    np.testing.assert_array_equal(sampling.parse_labels("1, 2,3", 10), [1, 2, 3])
    assert sampling.parse_labels(None, 10) is None
    with pytest.raises(ValueError, match="unconditional"):
        sampling.parse_labels("1", 0)
    with pytest.raises(ValueError, match="comma-separated integers"):
        sampling.parse_labels("a,b", 10)


def test_evaluator_writes_finite_metrics_and_caches_reference(tiny_run, tiny_config, tmp_path):
    workdir, _ = tiny_run
    config = tiny_config
    config.eval.num_samples = 16
    config.eval.num_reference = 16
    config.eval.num_steps = 2
    config.eval.batch_size = 16
    mesh = sharding.create_mesh(-1, 1)
    model = models.create_model(config.model)
    abstract, _ = train_step_lib.sharded_abstract_params(model, config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    params = ckpt.restore_params(20, abstract, ema_index=0)
    ckpt.close()
    out_dir = tmp_path / "evalrun"
    evaluator = evaluator_lib.Evaluator(config, mesh, str(out_dir), model=model)
    results = evaluator(params, 20)
    assert set(results) == {"fd_effnet_lite0", "kid_effnet_lite0", "kid_effnet_lite0_std"}
    assert np.isfinite(results["fd_effnet_lite0"]) and results["fd_effnet_lite0"] > 0
    record = json.loads((out_dir / "eval" / "step_00000020.json").read_text())
    assert record["fd_effnet_lite0"] == pytest.approx(results["fd_effnet_lite0"])
    assert record["reference_split"] == "test"
    cached = [f for f in os.listdir(out_dir / "eval") if f.startswith("ref_")]
    assert len(cached) == 1 and "effnet_lite0_16" in cached[0]
