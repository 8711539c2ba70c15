"""Fixtures that put the tiny SDXL pipeline and SDXL LoRAs under the names the SD 1.x tests use.

A test module importing `pipe` and `loras` from here runs the SD 1.x test functions it imports
on SDXL unchanged: same LoRA roles (cat/sks, dog/zwx, car/vrn, te with text-encoder parts for
both encoders, te_kohya with the same weights in kohya's SDXL layout).
"""

from __future__ import annotations

import pytest

from pipelines.tiny import tiny_sdxl_pipeline, write_random_lora


@pytest.fixture()
def pipe():
    """A fresh tiny SDXL pipeline per test, so no test sees another's adapters."""
    pipeline = tiny_sdxl_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_loras")
    reference = tiny_sdxl_pipeline(seed=0)
    return {
        "cat": write_random_lora(reference, folder / "cat.safetensors", 1, trigger="sks", concept="cat"),
        "dog": write_random_lora(reference, folder / "dog.safetensors", 2, trigger="zwx", concept="dog"),
        "car": write_random_lora(reference, folder / "car.safetensors", 3, trigger="vrn", concept="car"),
        "te": write_random_lora(
            reference, folder / "te.safetensors", 4, text_encoder=True, trigger="sks", concept="cat"
        ),
        "te_kohya": write_random_lora(
            reference, folder / "te_kohya.safetensors", 4, text_encoder=True, fmt="kohya", trigger="sks"
        ),
    }
