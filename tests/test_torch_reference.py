"""benchmarks/torch_reference.py's table: what it compares against, and that the docs match it.

The timing itself needs the reference's own torch virtual environment, so it is not run here.
"""

import importlib.util
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location(
        "torch_reference", REPO / "benchmarks" / "torch_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(images_per_sec, matmul=1e11):
    return {"images_per_sec": images_per_sec, "flops_per_sec": 1e11, "batch_size": 8,
            "num_params": 1e6, "flops_per_step": 1e11, "matmul_flops_per_sec": matmul}


def test_ratio_is_against_the_faster_reference_row():
    tr = _module()
    plain, tuned = tr.REFERENCE_ROWS.values()
    record = {"command": "x", "rounds": 2, "repeats": 10, "threads": 2, "torch": "2",
              "loads": [0.5, 1.0],
              "sizes": {"64": {plain: [_run(4.0), _run(4.2)], tuned: [_run(5.0), _run(5.0)],
                               "this project, matched layout": [_run(7.5), _run(7.5)]}}}
    table = tr.markdown(record)
    rows = {line.split("|")[2].strip(): line.split("|")[-2].strip()
            for line in table.splitlines() if line.startswith("| 64")}
    assert rows == {plain: "0.82×", tuned: "1.00×", "this project, matched layout": "1.50×"}


def test_docs_table_is_rendered_from_its_json():
    record = json.loads((REPO / "docs" / "cpu_reference.json").read_text())
    assert _module().markdown(record) == (REPO / "docs" / "cpu_reference.md").read_text()
