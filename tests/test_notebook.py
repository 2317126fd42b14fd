"""Executes notebooks/simple_diffusion_demo.ipynb top to bottom, as a user would.

The notebook runs in a real Jupyter kernel (nbclient + ipykernel; the kernel
inherits the 8 simulated CPU devices from conftest.py). A cell injected after
the "parameters" cell (papermill's convention) makes the run small: the tiny
config for 20 steps, 8 sampling steps, 16 samples, a temporary workdir and the
session's TFDS data_dir. The checks read what the notebook produced: its
results JSON, the sample grid PNGs and the figures in the cell outputs.
"""

import json
import math
import os
import pathlib

import nbclient
import nbformat
import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "simple_diffusion_demo.ipynb"
NUM_TRAIN_STEPS = 20
SAMPLE_STEPS = 8
NUM_SAMPLES = 16  # A multiple of the 8 simulated devices.
SAMPLERS = ("ddpm", "heun")


def _inject_parameters(nb: nbformat.NotebookNode, params: dict) -> None:
    """Inserts a cell assigning ``params`` right after the cell tagged "parameters"."""
    index = [i for i, cell in enumerate(nb.cells)
             if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(index) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    defined = {}
    exec(nb.cells[index[0]].source, {}, defined)  # pylint: disable=exec-used
    unknown = set(params) - set(defined)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index[0] + 1, cell)


def _image_outputs(nb: nbformat.NotebookNode) -> list[tuple[int, str]]:
    """(cell index, first source line) for every cell output holding a PNG figure."""
    found = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                found.append((i, cell.source.splitlines()[0]))
    return found


def test_notebook_runs_top_to_bottom(fashion_mnist_dir, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    workdir = tmp_path / "workdir"
    _inject_parameters(nb, dict(
        CONFIG="tiny", NUM_TRAIN_STEPS=NUM_TRAIN_STEPS, WORKDIR=str(workdir),
        DATA_DIR=fashion_mnist_dir, SAMPLERS=SAMPLERS, SAMPLE_STEPS=SAMPLE_STEPS,
        NUM_SAMPLES=NUM_SAMPLES, GUIDANCE=1.0, SEED=0))
    cwd = tmp_path / "cwd"  # Relative paths in the notebook must not touch the repo.
    cwd.mkdir()
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}})
    client.execute()  # Raises CellExecutionError (with the traceback) if any cell fails.

    # The figures: SNR-shift picture, schedules, loss curve, sample grids.
    figures = _image_outputs(nb)
    assert len(figures) == 4, figures

    results = json.loads((workdir / "notebook_results.json").read_text())

    # SNR shift: 8x8 pooling divides the noise variance by s^2 = 64.
    snr = results["snr_shift"]
    assert snr["pool_factor"] == 8 and snr["expected_ratio"] == 64
    assert abs(snr["snr_ratio"] / 64 - 1) < 0.05, snr["snr_ratio"]
    assert math.isclose(snr["shift"], 2 * math.log(64 / 512), rel_tol=1e-6)
    lams = np.array(snr["logsnrs"])
    emp = {k: np.array(v) for k, v in snr["empirical_logsnr"].items()}
    # Pooled 512 px noise at lambda has logSNR lambda + 2 log 8 at 64 px ...
    np.testing.assert_allclose(emp["(a) 512, pooled"], lams + 2 * math.log(8), atol=0.1)
    # ... a 64 px image at lambda has lambda, and the shifted schedule matches it.
    np.testing.assert_allclose(emp["(b) 64"], lams, atol=0.1)
    np.testing.assert_allclose(emp["(c) 512 shifted, pooled"], lams, atol=0.1)

    # Schedules: cosine in [-15, 15]; shifted by -4.159 everywhere; the interpolated one
    # starts at the 256-reference shift (t = 0) and ends at the 32-reference shift (t = 1).
    sched = results["schedules"]
    np.testing.assert_allclose(sched["cosine_ends"], [15.0, -15.0], atol=1e-3)
    np.testing.assert_allclose(sched["shifted_ends"], [10.8411, -19.1589], atol=1e-3)
    np.testing.assert_allclose(sched["shifted_minus_cosine"], [-4.1589] * 2, atol=1e-3)
    np.testing.assert_allclose(
        sched["interpolated_ends"],
        [15 + 2 * math.log(256 / 512), -15 + 2 * math.log(32 / 512)], atol=1e-3)
    assert sched["max_abs_alpha2_plus_sigma2_minus_1"] < 1e-5

    # Training ran to the requested step with a finite loss, and logged a loss curve.
    assert results["train"]["step"] == NUM_TRAIN_STEPS
    assert math.isfinite(results["train"]["loss"]) and results["train"]["loss"] > 0
    assert results["train"]["loss_steps"][-1] == NUM_TRAIN_STEPS
    assert (workdir / "checkpoints" / str(NUM_TRAIN_STEPS)).is_dir()

    # Two samplers, each a grid of 16 32x32x1 images, 10 per row (one class per column).
    assert set(results["samples"]) == set(SAMPLERS)
    grids = {}
    for sampler in SAMPLERS:
        info = results["samples"][sampler]
        assert info["images_shape"] == [NUM_SAMPLES, 32, 32, 1]
        assert info["labels"] == [i % 10 for i in range(NUM_SAMPLES)]
        expected = [2 * 33 + 1, 10 * 33 + 1, 1]
        assert info["grid_shape"] == expected
        assert os.path.dirname(info["path"]) == str(workdir)
        grid = np.asarray(Image.open(info["path"]))
        assert grid.shape == tuple(expected[:2]) and grid.dtype == np.uint8
        # Real images, not a constant.
        assert info["pixel_std"] > 1.0
        grids[sampler] = grid
    assert np.abs(grids["ddpm"].astype(int) - grids["heun"].astype(int)).mean() > 1.0
