"""The shipped toy-world concept LoRAs: they load with their trigger/concept and draw their concept."""
import pytest

import toyworld
from compose import LoraSpec
from compose.loading import resolve_loras
from pipelines.loading import load_pipeline
from compose.adapters import tuner_layers
from compose.methods.tara import masked_kv_modules
from toyworld.train_loras import CLASS_WORDS, VARIANTS, always_on, concept_rate, gates, generate, lora_file

LORAS = toyworld.default_lora_path()
SEEDS = range(6)
# Measured on 16 seeds in toyworld/loras/RECIPE.md; the base model never draws a concept.
# A gain of half the seeds leaves a wide margin for the 6-seed sample.
MIN_GAIN = 0.5
# Files whose alone gate measured below 60% of 32 seeds (toyworld/loras/RECIPE.md): the token-masked
# files, which were trained on an earlier base model.
WEAK = {(trigger, "tara") for trigger in CLASS_WORDS}
BELOW_GATE = pytest.mark.xfail(reason="below its alone gate")
FILES = [
    pytest.param(trigger, variant, marks=[BELOW_GATE] if (trigger, variant) in WEAK else [])
    for variant in VARIANTS
    for trigger in CLASS_WORDS
]


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = load_pipeline(str(toyworld.default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shipped_loras_carry_trigger_and_concept(toy_pipe, variant):
    paths = [lora_file(LORAS, trigger, variant) for trigger in CLASS_WORDS]
    resolved = resolve_loras(toy_pipe, paths)
    assert [(lora.trigger, lora.concept) for lora in resolved] == list(CLASS_WORDS.items())
    assert all(path.stat().st_size < 2_000_000 for path in paths)


@pytest.mark.parametrize("trigger, variant", FILES)
def test_lora_raises_the_judged_concept_rate(toy_pipe, trigger, variant):
    prompt, method = gates(trigger)[0].prompt, VARIANTS[variant][2]
    loras = [LoraSpec(str(lora_file(LORAS, trigger, variant)))]
    with_lora = concept_rate(generate(toy_pipe, prompt, SEEDS, loras, method), trigger)
    base = concept_rate(generate(toy_pipe, prompt, SEEDS), trigger)
    assert with_lora - base >= MIN_GAIN, (with_lora, base)


def test_token_masked_lora_without_its_trigger_keeps_only_its_unmasked_layers(toy_pipe):
    """With no trigger in the prompt a TARA LoRA's cross-attention k/v change acts at no token."""
    unet = toy_pipe.unet
    masked = masked_kv_modules(unet)
    with always_on(toy_pipe, lora_file(LORAS, "zwx", "tara"), 0.8, token_masked=True):
        [adapter] = {name for layer in tuner_layers(unet) for name in layer.active_adapters}
        scales = {name: module.scaling[adapter] for name, module in unet.named_modules()
                  if module in tuner_layers(unet) and adapter in module.scaling}
    off = {name for name, scale in scales.items() if scale == 0}
    assert off == masked & set(scales) and off
    assert all(scale > 0 for name, scale in scales.items() if name not in off)
    with always_on(toy_pipe, lora_file(LORAS, "zwx", "tara"), 0.8):
        assert all(module.scaling[adapter] > 0 for module in tuner_layers(unet) if adapter in module.scaling)
