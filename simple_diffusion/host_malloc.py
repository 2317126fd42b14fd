"""Transparent huge pages for host memory: the CLIs restart once with glibc's `hugetlb` tunable.

XLA:CPU gives every run of a compiled program a fresh temp allocation (694 MB for
configs/cpu_reference.py:64's train step) and returns it when the run ends. glibc serves
allocations that large with mmap and frees them with munmap, so every step faults in every
page again: 173,000 minor faults and 0.35-0.42 s of kernel CPU time per 1.3-1.6 s step on
a 2-core VM. glibc >= 2.35's `glibc.malloc.hugetlb=1` tunable makes malloc ask for
transparent huge pages (madvise MADV_HUGEPAGE) on what it maps, so the same memory arrives
in 2 MiB pages: about 1,300 faults and 0.1 s of kernel time per step, and the step took
1.13-1.19 s instead of 1.26-1.57 s (alternating processes; docs/benchmarks.md).
GPU and TPU runs keep their device memory in their own allocators; their host side is
unaffected beyond the pages it maps.

glibc reads tunables once, at process start, so they cannot be switched on from inside a
running interpreter. The command-line entry points (`python -m simple_diffusion.main`,
`.benchmark`, `.sample`, `.evaluate`, `.distill`, `.experiments`) therefore call
`reexec_with_hugepages()` first (through `cli_start.prepare_process()`): when it applies, the process
replaces itself (os.execve, same pid, argv and environment plus the tunable) before any
work starts. Nothing happens when GLIBC_TUNABLES is already set (the user's choice wins),
when SIMPLE_DIFFUSION_DEFAULT_MALLOC=1, on non-glibc or older systems, or when the kernel
has transparent huge pages disabled. Library use (imports, notebooks, the tests) never
re-executes anything; a notebook or test runner gets the same effect by starting with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in its environment.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SIMPLE_DIFFUSION_DEFAULT_MALLOC"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the glibc.malloc.hugetlb tunable


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None when the C library is not glibc."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def transparent_hugepages_mode() -> str | None:
    """The kernel's THP mode ('always', 'madvise' or 'never'), None if it cannot be read."""
    try:
        with open(_THP_ENABLED) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def hugepage_environ(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                     thp_mode: str | None) -> dict[str, str] | None:
    """The environment to restart with, or None when the tunable does not apply.

    Args:
      environ: the current environment.
      glibc: `glibc_version()`.
      thp_mode: `transparent_hugepages_mode()`.
    """
    if "GLIBC_TUNABLES" in environ or environ.get(OPT_OUT) == "1":
        return None
    if glibc is None or glibc < _MIN_GLIBC or thp_mode not in ("always", "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": TUNABLE}


def reexec_with_hugepages() -> None:
    """Restarts this command with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where that applies.

    Call it first thing under `if __name__ == "__main__":`, before any work; it does not
    return when it restarts the process.
    """
    environ = hugepage_environ(os.environ, glibc_version(), transparent_hugepages_mode())
    if environ is None:
        return
    print(f"simple_diffusion: restarting with GLIBC_TUNABLES={TUNABLE} (host memory in "
          f"transparent huge pages; {OPT_OUT}=1 turns this off).", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
