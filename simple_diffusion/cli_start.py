"""What every command line does first, before it imports data or starts JAX.

`python -m simple_diffusion.main` (and `.benchmark`, `.sample`, `.evaluate`, `.distill`,
`.experiments`) call `prepare_process()` under `if __name__ == "__main__":` before their
other imports (a restart would redo them). It
  1. restarts the process once with glibc's hugetlb malloc tunable where that applies
     (`host_malloc`: XLA:CPU's per-step temp memory in transparent huge pages), then
  2. adds XLA:CPU's multi-output fusion to XLA_FLAGS (`xla_cpu.set_process_flags`: the
     train step stops copying its state every step).
Each step leaves a user's own setting alone (GLIBC_TUNABLES set, or the option already in
XLA_FLAGS). Library use (imports, notebooks, the tests) runs neither by itself; the tests'
conftest and the notebook call `xla_cpu.set_process_flags()`.
"""

from simple_diffusion import host_malloc


def prepare_process() -> None:
    """Applies this project's process-wide CPU settings; may restart the process (execve).

    Call it before importing anything heavy: a restart redoes the imports.
    """
    host_malloc.reexec_with_hugepages()
    # Imported after the restart: xla_cpu imports jax (~1.7 s).
    from simple_diffusion import xla_cpu  # pylint: disable=g-import-not-at-top
    xla_cpu.set_process_flags()
