"""Shared test setup: golden-vector location, deterministic seeds, small threads."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # golden_adapters, helpers


if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n N: N workers share the cores, so each takes one thread (no oversubscription)
    torch.set_num_threads(1)


def golden_dirs() -> list[Path]:
    """Golden-vector roots: ``$VISIONPE_GOLDEN_DIR`` (several folders separated by ``os.pathsep``), else
    ``../shared/golden`` and ``../shared/golden-next`` (sets of encodings that may not exist yet)."""
    env = os.environ.get('VISIONPE_GOLDEN_DIR')
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    shared = HERE.parent.parent / 'shared'
    return [shared / 'golden', shared / 'golden-next']


def golden_dir() -> Path:
    """The first golden root (the sets of the encodings that exist)."""
    return golden_dirs()[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Slow end-to-end tests first: with ``-n 2`` they then overlap the many short ones instead of
    running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # stable: keeps file order otherwise


_EXIT_STATUS = {'code': 0}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS['code'] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter teardown once pytest has reported everything.

    After in-process Lightning fits (detection, DDP spawn tests) the interpreter was seen twice to spin at
    100% CPU in shutdown, after the summary was printed: a CI run would then hang until its time limit.
    Every report (terminal summary, junit) is written before this last hook; set
    VISIONPE_TEST_CLEAN_EXIT=0 to get the normal teardown when debugging."""
    # an xdist worker must exit normally so that its last reports reach the controller
    if os.environ.get('VISIONPE_TEST_CLEAN_EXIT', '1') != '0' and not os.environ.get('PYTEST_XDIST_WORKER'):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS['code'])
