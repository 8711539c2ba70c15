"""Shared fixtures: a tiny pipeline and tiny LoRAs in both file layouts, all built in code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging

import pytest
import torch

from pipelines.tiny import tiny_pipeline, write_random_lora

PROMPT = "a sks cat and a zwx dog"


class _IgnoredKwargs(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "are not expected by" in record.getMessage():
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def fail_on_ignored_attention_kwargs():
    """diffusers drops cross_attention_kwargs a processor does not declare: a method option silently did nothing."""
    handler = _IgnoredKwargs()
    logger = logging.getLogger("diffusers.models.attention_processor")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    assert not handler.messages, handler.messages


@pytest.fixture(autouse=True, scope="session")
def quiet_machine(tmp_path_factory):
    """One torch thread (tiny models gain nothing from more, and parallel runs oversubscribe the cores);
    profile caches go to a temporary folder, never the user's home."""
    torch.set_num_threads(1)
    os.environ["LORACOMPOSE_PROFILE_CACHE"] = str(tmp_path_factory.mktemp("profiles"))


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


@pytest.fixture()
def pipe():
    """A fresh tiny pipeline per test (0.2 s), so no test sees another's adapters."""
    pipeline = tiny_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def loras(lora_dir):
    return write_test_loras(tiny_pipeline(seed=0), lora_dir)


def write_test_loras(reference, folder) -> dict:
    """Three UNet LoRAs (triggers sks/zwx/vrn) and one with a text-encoder part in diffusers and kohya layout."""
    return {
        "cat": write_random_lora(reference, folder / "cat.safetensors", 1, trigger="sks", concept="cat"),
        "dog": write_random_lora(reference, folder / "dog.safetensors", 2, trigger="zwx", concept="dog"),
        "car": write_random_lora(reference, folder / "car.safetensors", 3, trigger="vrn", concept="car"),
        "te": write_random_lora(reference, folder / "te.safetensors", 4, text_encoder=True, trigger="sks", concept="cat"),
        "te_kohya": write_random_lora(
            reference, folder / "te_kohya.safetensors", 4, text_encoder=True, fmt="kohya", trigger="sks"
        ),
    }


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt=PROMPT, steps=3, seed=0, **kwargs):
    """A short, seeded call returning numpy images."""
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, num_inference_steps=steps, generator=generator(seed), **kwargs)
