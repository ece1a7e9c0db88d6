"""Test-wide settings: no Hub access (everything here runs offline), quiet libraries."""

from __future__ import annotations

import logging
import os

import pytest

# Set before transformers, datasets or huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the tests' models are tiny, so thread start-up and contention cost more than
# they gain, and test subprocesses (multi-process runs, jobs) inherit this instead of oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture
def finetune_records():
    """Collect the records of the `finetune` logger during a test.

    `setup_logging` stops that logger from propagating to the root logger, so pytest's caplog captures its records
    only in tests that run before the first `setup_logging` call.
    """
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("finetune")
    level = logger.level
    # Before `setup_logging` the logger inherits the root's WARNING level and would drop info records.
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)
