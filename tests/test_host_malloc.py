"""host_malloc: when the CLIs restart with glibc's hugetlb tunable, and what it changes."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from simple_diffusion import host_malloc

_ENV = {"PATH": "/usr/bin", "HOME": "/root"}


@pytest.mark.parametrize("environ, glibc, thp, applies", [
    (_ENV, (2, 36), "madvise", True),
    (_ENV, (2, 35), "always", True),
    (_ENV, (2, 34), "madvise", False),          # no hugetlb tunable before glibc 2.35
    (_ENV, None, "madvise", False),             # musl or another C library
    (_ENV, (2, 36), "never", False),            # THP switched off in the kernel
    (_ENV, (2, 36), None, False),               # no THP support to read
    ({**_ENV, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", False),
    ({**_ENV, host_malloc.OPT_OUT: "1"}, (2, 36), "madvise", False),
])
def test_hugepage_environ(environ, glibc, thp, applies):
    out = host_malloc.hugepage_environ(environ, glibc, thp)
    if applies:
        assert out == {**environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    else:
        assert out is None


def test_host_probes_parse_this_machine():
    name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    version = host_malloc.glibc_version()
    if name.startswith("glibc "):
        assert version == tuple(int(v) for v in name.split()[1].split(".")[:2])
    else:
        assert version is None
    assert host_malloc.transparent_hugepages_mode() in ("always", "madvise", "never", None)


def _environ_that_restarts() -> dict[str, str]:
    """This environment without the user's tunables or the opt-out, as a CLI would see
    it on a fresh shell (it restarts where _APPLIES)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", host_malloc.OPT_OUT)}


_APPLIES = host_malloc.hugepage_environ(
    {}, host_malloc.glibc_version(), host_malloc.transparent_hugepages_mode()) is not None

# Restarts like a CLI, then counts the page faults of producing a fresh 64 MiB array (XLA
# maps a new output buffer per call, as it does the train step's temp allocation).
_PROBE = textwrap.dedent("""
    import json, os, resource
    from simple_diffusion import host_malloc
    host_malloc.reexec_with_hugepages()
    import jax, jax.numpy as jnp
    x = jnp.ones((16 * 2**20,), jnp.float32)
    f = jax.jit(lambda x: x * 2.0)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        y = f(x); y.block_until_ready(); del y
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
""")


def _probe(**env):
    environ = _environ_that_restarts()
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**environ, **env},
                         capture_output=True, text=True, check=True, timeout=300)
    return __import__("json").loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_restart_maps_huge_pages():
    """The restarted process has the tunable, and a 64 MiB output takes a small fraction of
    the 16,384 faults that 4 KiB pages cost (measured without the tunable in the same test)."""
    plain, _ = _probe(**{host_malloc.OPT_OUT: "1"})
    assert plain["tunables"] is None
    assert plain["faults"] >= 16384 * 0.9  # one fault per 4 KiB page of the fresh buffer
    tuned, stderr = _probe()
    if not _APPLIES:  # this host cannot use the tunable: the probe must not restart
        assert tuned["tunables"] is None and "restarting" not in stderr
        return
    assert tuned["tunables"] == host_malloc.TUNABLE
    assert "restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in stderr
    assert tuned["faults"] < plain["faults"] / 8


def test_cli_restarts_once_and_respects_user_tunables():
    environ = _environ_that_restarts()
    cmd = [sys.executable, "-m", "simple_diffusion.benchmark", "--help"]
    out = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300)
    assert "Benchmarks:" in out.stdout, out.stderr[-2000:]  # absl's --help, then exit 1
    assert out.stderr.count("restarting with GLIBC_TUNABLES") == (1 if _APPLIES else 0)
    mine = subprocess.run(cmd, env={**environ, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                          capture_output=True, text=True, timeout=300)
    assert "Benchmarks:" in mine.stdout and "restarting" not in mine.stderr


CLIS = ["main", "sample", "evaluate", "distill", "benchmark", "experiments/__main__"]


@pytest.mark.parametrize("cli", CLIS)
def test_cli_prepares_the_process_before_its_other_imports(cli):
    """A restart redoes every import made before it, so prepare_process comes first."""
    path = pathlib.Path(host_malloc.__file__).parent / f"{cli}.py"
    body = ast.parse(path.read_text()).body[1:]  # After the docstring.
    assert ast.unparse(body[0]) == "from simple_diffusion import cli_start"
    assert ast.unparse(body[1]) == ("if __name__ == '__main__':\n"
                                    "    cli_start.prepare_process()")


def test_cli_restarts_before_importing_jax():
    environ = _environ_that_restarts()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "simple_diffusion.sample",
                          "--helpshort"], env=environ, capture_output=True, text=True, timeout=300)
    assert "--workdir" in out.stdout, out.stderr[-2000:]  # absl's help, then exit 1.
    before, restart, after = out.stderr.partition("restarting with GLIBC_TUNABLES")
    assert bool(restart) == _APPLIES

    def imported(text):
        return {line.split("|")[-1].strip() for line in text.splitlines()
                if line.startswith("import time:")}

    if _APPLIES:
        assert "simple_diffusion.cli_start" in imported(before)
        assert not {"jax", "flax", "tensorflow"} & imported(before)
    assert {"jax", "flax"} <= imported(after if _APPLIES else before)
