"""Every registered method gets the same contract tests: it runs, restores state, and checks input early."""

import pytest

from compose import LoraSpec
from compose.adapters import snapshot
from compose.errors import ComposeError, InvalidOptionError, TriggerNotInPromptError
from compose.methods import METHODS
from tests.conftest import PROMPT, run

# Options a method needs to run on these LoRAs at all: klora must be told which one is the style.
SHARED_OPTIONS = {"klora": {"style_triggers": ["zwx"]}}


def two_loras(loras):
    return [
        LoraSpec(loras["cat"], 0.9, region=(0, 0, 1, 0.5)),
        LoraSpec(loras["dog"], 0.8, region=(0, 0.5, 1, 1)),
    ]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_runs_and_leaves_pipeline_as_it_was(pipe, loras, method):
    before_images = run(pipe, steps=2).images
    processors = dict(pipe.unet.attn_processors)
    out = run(pipe, loras=two_loras(loras), method=method, method_options=SHARED_OPTIONS.get(method), steps=2)
    assert out.images.shape == (1, 64, 64, 3)
    assert out.method == method and out.unet_calls >= 1
    assert dict(pipe.unet.attn_processors) == processors
    state = snapshot([pipe.unet, pipe.text_encoder])
    assert all(active == [] and not disabled for active, disabled, _ in state.layers.values())
    assert (run(pipe, steps=2).images == before_images).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_restored_when_the_loop_raises(pipe, loras, method):
    processors = dict(pipe.unet.attn_processors)

    def explode(*args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(pipe, loras=two_loras(loras), method=method, method_options=SHARED_OPTIONS.get(method), steps=2,
            callback_on_step_end=explode)  # fmt: skip
    assert dict(pipe.unet.attn_processors) == processors
    assert all(active == [] for active, _, _ in snapshot([pipe.unet, pipe.text_encoder]).layers.values())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_option_named(pipe, loras, method):
    with pytest.raises(InvalidOptionError, match="no_such_option"):
        run(pipe, loras=two_loras(loras), method=method, method_options={"no_such_option": 1})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bad_input_fails_before_any_unet_call(pipe, loras, tmp_path, method):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ComposeError):
        run(pipe, PROMPT, loras=[*two_loras(loras), tmp_path / "missing.safetensors"], method=method,
            method_options=SHARED_OPTIONS.get(method))  # fmt: skip
    assert calls == []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trigger_missing_from_the_prompt_a_lora_is_given_is_refused(pipe, loras, method):
    """The global prompt, or a region's / LoRA's own prompt where the method uses one, must call the concept."""
    own_prompts = [LoraSpec(spec.source, spec.weight, region=spec.region, prompt=text)
                   for spec, text in zip(two_loras(loras), ["a cat", "a zwx dog"])]  # fmt: skip
    with pytest.raises(TriggerNotInPromptError, match=r"LoRA 'cat' needs its trigger word 'sks'"):
        run(pipe, "a cat and a zwx dog", loras=own_prompts, method=method, method_options=SHARED_OPTIONS.get(method),
            steps=1)  # fmt: skip
