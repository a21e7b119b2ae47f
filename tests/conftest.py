"""Fixtures every module that runs the real generator shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from itk import selftest
from itk.runtime.tiny import write_tiny_weights


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Tiny random weights in the official layout, recorded as verified as `itk fetch` records downloads: written
    once per test session for every module that runs the generator on them (none of them changes the files)."""
    weights = tmp_path_factory.mktemp("tiny") / "weights"
    write_tiny_weights(weights)
    selftest.record_tiny_verdicts(weights)
    return weights
