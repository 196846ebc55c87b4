"""Fixtures shared by several test files."""

import os

import pytest
import torch


@pytest.fixture
def one_thread():
    """Two OpenMP threads on a shared 2-core machine can make a tiny step 30× slower; one is plenty here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Lightning's seed variables as the test session found them.
LIGHTNING_SEED_KEYS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
SESSION_SEED_ENV = {key: os.environ.get(key) for key in LIGHTNING_SEED_KEYS}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test (or a module fixture) that runs ``fit`` in-process leaves Lightning's seed in the environment
    (``PL_GLOBAL_SEED``); processes a later test spawns inherit it and reseed when their strategy sets up (LoRA's
    initial adapters then differ from the test's own process). Before any fixture of a test is set up, the seed
    variables are put back as the session found them."""
    for key, value in SESSION_SEED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
