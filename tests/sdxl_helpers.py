"""Fixtures that put the tiny SDXL pipeline and SDXL LoRAs under the names the SD 1.x tests use.

A test module importing `pipe` and `loras` from here runs the SD 1.x test functions it imports
on SDXL unchanged: same LoRA roles (cat/sks, dog/zwx, car/vrn, te with text-encoder parts for
both encoders, te_kohya with the same weights in kohya's SDXL layout).
"""

from __future__ import annotations

import pytest

from pipelines.tiny import tiny_sdxl_pipeline
from tests.conftest import write_test_loras


@pytest.fixture()
def pipe():
    """A fresh tiny SDXL pipeline per test, so no test sees another's adapters."""
    pipeline = tiny_sdxl_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return write_test_loras(tiny_sdxl_pipeline(seed=0), tmp_path_factory.mktemp("sdxl_loras"))
