"""Developer tasks: ``python3 -m pip install nox && python3 -m nox -s <session>``.

Sessions: ``tests``, ``lint``, ``docs``, ``bench``, ``bench-peers`` and ``demo`` (a local node
plus ``examples/quickstart.py``). Each runs in its own virtualenv under
``.nox/``, reused between runs; it needs only ``python3`` and ``pip``.
"""

from __future__ import annotations

import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint", "docs"]
# A session whose interpreter is missing fails instead of being skipped, so
# `nox -s tests` can never "pass" without running a test.
nox.options.error_on_missing_interpreters = True

# Python 3.11 (the oldest supported, what CI pins) when it is installed;
# otherwise the interpreter running nox (any Python >= 3.11 works, and pip
# refuses older ones by name when it installs the package).
PYTHON = "3.11" if shutil.which("python3.11") else None


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, slow tests included: ``nox -s tests -- -x -m "not slow"``."""
    session.install(".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (code, tests, benchmarks, examples) and mypy (strict on src/droplet; see pyproject)."""
    session.install(".[lint]")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the HTML docs into docs/_build/html; any warning is an error."""
    session.install(".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html",
                *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Latency benchmarks (benchmarks/run.py); arguments after ``--`` go to it."""
    # trustme: the tls/wss targets make a throw-away CA and node certificate;
    # [fast]: numpy, which masks big ws:// frames (a recommended install measured).
    session.install(".[fast]", "trustme")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(name="bench-peers", python=PYTHON)
def bench_peers(session: nox.Session) -> None:
    """Droplet beside Ray and Dask distributed (benchmarks/peers.py); args after ``--``."""
    session.install(".[fast]", "trustme", "ray==2.60.0", "dask[distributed]")
    session.run("python", "benchmarks/peers.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Start a local node, run examples/quickstart.py against it, stop the node.

    The node's pid and log files and its data directory go to this session's
    temporary directory (``DROPLET_HOME``, ``XDG_DATA_HOME``), never to ``~/.droplet``
    or ``~/.local/share/droplet``.
    """
    session.install(".")
    tmp = session.create_tmp()
    env = {"DROPLET_HOME": tmp, "XDG_DATA_HOME": tmp}
    # A node left behind by an interrupted run would hold the port: stop it first.
    session.run("droplet", "stop-local", env=env, success_codes=[0, 1], silent=True)
    session.run("droplet", "start-local", env=env)
    try:
        session.run("python", "examples/quickstart.py", *session.posargs, env=env)
    finally:
        session.run("droplet", "stop-local", env=env)
