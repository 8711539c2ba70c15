"""The drop-in pipeline and the baseline methods: equivalences with diffusers and restored state."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from compose import LoraSpec
from compose.adapters import snapshot
from compose.errors import InvalidImageArgumentError, InvalidOptionError, UnknownMethodError, UnsupportedArgumentError
from compose.methods.switch import active_index
from tests.conftest import PROMPT, generator, run


def parent_call(pipe, steps=3, seed=0, **kwargs):
    return StableDiffusionPipeline.__call__(
        pipe, PROMPT, num_inference_steps=steps, generator=generator(seed), output_type="np", **kwargs
    ).images


def test_without_loras_exactly_the_parent(pipe):
    assert (run(pipe).images == parent_call(pipe)).all()


def test_merge_equals_diffusers_set_adapters(pipe, loras):
    ours = run(pipe, loras=[LoraSpec(loras["cat"], 0.7), LoraSpec(loras["te"], 1.3)], method="merge").images
    reference = type(pipe).from_pipe(pipe)
    reference.set_adapters(["cat", "te"], [0.7, 1.3])
    assert torch.allclose(torch.from_numpy(ours), torch.from_numpy(parent_call(reference)), atol=1e-5)


def test_fused_merge_equals_merge_and_unfuses(pipe, loras):
    specs = [loras["cat"], loras["dog"]]
    plain = run(pipe, loras=specs).images
    weights = {name: p.clone() for name, p in pipe.unet.state_dict().items()}
    fused = run(pipe, loras=specs, method_options={"fuse": True}).images
    assert abs(plain - fused).max() < 1e-3  # fusing reorders float sums
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.state_dict().items())  # bit for bit


def test_composite_with_one_lora_equals_that_lora(pipe, loras):
    alone = run(pipe, loras=[LoraSpec(loras["te"], 0.8)], method="merge").images
    composite = run(pipe, loras=[LoraSpec(loras["te"], 0.8)], method="composite").images
    assert abs(alone - composite).max() < 1e-5


def test_composite_batched_equals_sequential_passes(pipe, loras):
    specs = [loras["cat"], loras["dog"], loras["te"]]
    batched = run(pipe, loras=specs, method="composite")
    sequential = run(pipe, loras=specs, method="composite", method_options={"batched": False})
    assert abs(batched.images - sequential.images).max() < 1e-5
    assert (batched.unet_calls, batched.unet_passes) == (3, 9)
    assert (sequential.unet_calls, sequential.unet_passes) == (9, 9)


def test_composite_is_the_mean_of_guided_single_lora_predictions(pipe, loras):
    specs = [loras["cat"], loras["dog"]]
    composite = run(pipe, loras=specs, method="composite", steps=1, output_type="latent").images
    singles = [run(pipe, loras=[s], steps=1, output_type="latent").images for s in specs]
    # one scheduler step is linear in the noise prediction, so the latents average too
    assert torch.allclose(composite, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-3)


def test_switch_matches_callback_rotation_of_diffusers(pipe, loras):
    specs = [loras["cat"], loras["dog"]]
    ours = run(pipe, loras=specs, method="switch", steps=4, method_options={"switch_step": 2})
    assert ours.extras["active_adapters"] == ["cat", "cat", "dog", "dog"]
    reference = type(pipe).from_pipe(pipe)
    reference.load_lora_weights(str(loras["cat"]), adapter_name="cat") if "cat" not in reference.get_list_adapters().get(
        "unet", []
    ) else None
    names = ["cat", "dog"]
    reference.set_adapters(["cat"])

    def rotate(p, i, t, kwargs):
        p.set_adapters([names[active_index(i + 1, 2, 2)]])
        return kwargs

    expected = parent_call(reference, steps=4, callback_on_step_end=rotate)
    assert abs(ours.images - expected).max() < 1e-5


def test_switch_step_option_validated(pipe, loras):
    with pytest.raises(InvalidOptionError, match="switch_step"):
        run(pipe, loras=[loras["cat"]], method="switch", method_options={"switch_step": 0})


def test_state_restored_after_call_and_after_exception(pipe, loras):
    run(pipe, loras=[loras["cat"]])  # adapters now loaded, none active
    processors = dict(pipe.unet.attn_processors)
    state = snapshot([pipe.unet, pipe.text_encoder])
    before = run(pipe).images

    def explode(*args):
        raise RuntimeError("boom")

    for method in ("merge", "composite", "switch"):
        run(pipe, loras=[loras["cat"], loras["te"]], method=method)
        with pytest.raises(RuntimeError, match="boom"):
            run(pipe, loras=[loras["dog"], loras["te"]], method=method, callback_on_step_end=explode)
        assert dict(pipe.unet.attn_processors) == processors
        after = snapshot([pipe.unet, pipe.text_encoder]).layers
        for layer, (active, disabled, scaling) in state.layers.items():  # new adapters stay loaded, inactive
            assert after[layer][:2] == (active, disabled)
            assert {name: after[layer][2][name] for name in scaling} == scaling
    assert (run(pipe).images == before).all()


def test_user_adapters_left_as_they_were(pipe, loras):
    pipe.load_lora_weights(str(loras["dog"]), adapter_name="mine")
    pipe.set_adapters(["mine"], [0.5])
    before = run(pipe).images
    run(pipe, loras=[loras["cat"]], method="composite")
    assert pipe.get_active_adapters() == ["mine"]
    assert (run(pipe).images == before).all()


def test_loaded_adapters_are_reused(pipe, loras):
    run(pipe, loras=[loras["cat"]])
    calls = []
    original = pipe.load_lora_weights
    pipe.load_lora_weights = lambda *a, **k: calls.append(a) or original(*a, **k)
    run(pipe, loras=[loras["cat"], loras["dog"]])
    assert len(calls) == 1  # only the new one


def test_unknown_method_and_option(pipe, loras):
    with pytest.raises(UnknownMethodError, match="composite"):
        run(pipe, loras=[loras["cat"]], method="nope")
    with pytest.raises(InvalidOptionError, match="valid options"):
        run(pipe, loras=[loras["cat"]], method="merge", method_options={"fusee": True})


@pytest.mark.parametrize(
    "kwargs",
    [{"prompt": ["a", "b"]}, {"prompt_embeds": torch.zeros(1, 77, 32)}, {"cross_attention_kwargs": {"scale": 0.5}}],
)
def test_unsupported_arguments_named(pipe, loras, kwargs):
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(UnsupportedArgumentError):
        pipe(prompt, loras=[loras["cat"]], num_inference_steps=2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"height": 36}, "height 36 must be a positive multiple of 8"), ({"width": -8}, "width -8"),
     ({"num_inference_steps": 0}, "at least 1, got 0")],
)  # fmt: skip
def test_sizes_and_step_counts_the_model_cannot_honour_are_named(pipe, loras, kwargs, message):
    kwargs = {"num_inference_steps": 2, **kwargs}
    with pytest.raises(InvalidImageArgumentError, match=message):
        pipe(PROMPT, loras=[loras["cat"]], **kwargs)


def test_num_images_and_non_square(pipe, loras):
    out = run(pipe, loras=[loras["cat"], loras["dog"]], method="composite", num_images_per_prompt=2, height=64, width=96)
    assert out.images.shape == (2, 64, 96, 3)
