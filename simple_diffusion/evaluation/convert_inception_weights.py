r"""Converts pytorch-fid's InceptionV3 weights into the `.npz` the JAX model loads.

The standard FID weights, `pt_inception-2015-12-05-6726825d.pth`, are
published by pytorch-fid (github.com/mseitzer/pytorch-fid releases); no
package ships them and nothing here downloads them. Fetch the file once and
convert it (torch is not needed):

  python -m simple_diffusion.evaluation.convert_inception_weights \
      --input=pt_inception-2015-12-05-6726825d.pth \
      --output=inception_v3_fid.npz

then pass `--output`'s path as `weights_path` to
`features.get_feature_extractor("inception_v3", ...)`.
"""

import hashlib
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from simple_diffusion.evaluation import inception_v3

# The file name carries the first 8 hex digits of its SHA-256.
_EXPECTED_SHA256_PREFIX = "6726825d"


def flatten(variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """Nested variables -> `/`-joined keys, the layout `load_variables` reads."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(variables)}


def convert(input_path: str, output_path: str) -> None:
    """Converts `input_path` (`.pth`) into `output_path` (`.npz`)."""
    with open(input_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(_EXPECTED_SHA256_PREFIX):
        logging.warning(
            "%s has SHA-256 %s, not the standard pt_inception-2015-12-05-%s "
            "file: FID values will not be comparable with published ones.",
            input_path, digest, _EXPECTED_SHA256_PREFIX)
    variables = inception_v3.variables_from_torch_file(input_path)
    np.savez(output_path, **flatten(variables))


def _define_flags() -> None:
    # Defined only when run as a script: importing this module (tests, other
    # tools) must not claim the global flag names --input / --output.
    flags.DEFINE_string(
        "input", None, "pt_inception-2015-12-05-6726825d.pth from pytorch-fid.")
    flags.DEFINE_string("output", None, "Where to write the .npz.")
    flags.mark_flags_as_required(["input", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    convert(flags.FLAGS.input, flags.FLAGS.output)
    print(f"wrote {flags.FLAGS.output}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
