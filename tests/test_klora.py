"""klora: the choice per layer by hand, time from the step index, exact layer outputs, equivalences, early errors."""

import pytest
import torch
import torch.nn.functional as F

from compose import LoraSpec
from compose.adapters import activate
from compose.errors import InvalidOptionError
from compose.lora_delta import base_projection, dense_change, lora_delta
from compose.methods.klora import balance, style_scale, top_k_sum
from pipelines.random_adapters import write_random_adapter
from pipelines.tiny import random_lora_layers, tiny_pipeline, write_random_lora
from tests.conftest import PROMPT, run

STYLE_DOG = {"style_lora": "dog", "pattern": "s"}


def test_scores_balance_and_scales_by_hand():
    assert top_k_sum(torch.tensor([[3.0, -1.0], [0.0, -2.0]]), 2) == 5.0
    assert top_k_sum(torch.tensor([1.0, -4.0]), 10) == 5.0  # k beyond the entries: all of them
    ones = torch.ones(2, 2)
    # ratios 1, 1, 1, 20: mean 5.75, so 20 (>= 17.25) is dropped; the zero layer has no ratio
    content = [ones, ones, ones, 20 * ones, torch.zeros(2, 2)]
    assert balance(content, [ones] * 5) == 1.0
    assert balance([2 * ones, 4 * ones], [ones, ones]) == 3.0
    assert balance([torch.zeros(1)], [torch.zeros(1)]) == 1.0
    assert style_scale(0.5, "s", 1.5, 0.5) == 1.25
    assert style_scale(0.1, "s*", 1.5, 1.275) == pytest.approx(1.425)
    assert style_scale(0.5, "s*", 1.5, 1.275) == pytest.approx(0.525)  # (0.75 + 1.275) mod 1.5


def by_hand(weights, steps, alpha=8.0, rank=4):
    """Each layer's per-step style flags from the files' own matrices: dW = weight * alpha / rank * B A."""
    cat, dog = (random_lora_layers(tiny_pipeline(seed=0), seed) for seed in (1, 2))  # the files' weights
    changes = {
        name: [w * alpha / rank * up @ down for w, (down, up) in zip(weights, (cat[key], dog[key]))]
        for key in cat
        for name in [key[1]]
    }
    ratios = [float(c.abs().sum() / s.abs().sum()) for c, s in changes.values()]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    flags = {}
    for name, (c, s) in changes.items():
        top_c, top_s = (m.abs().flatten().topk(rank * rank).values.sum() for m in (c, s))
        flags[name] = [not float(top_c) / gamma > (1.5 * i / steps + 0.5) * float(top_s) for i in range(steps)]
    return gamma, flags


def test_the_choice_per_layer_is_the_hand_computation_and_ignores_the_weights_scale(pipe, loras):
    out = run(pipe, loras=[LoraSpec(loras["cat"], 0.9), LoraSpec(loras["dog"], 0.8)], method="klora",
              method_options=STYLE_DOG, steps=6)  # fmt: skip
    gamma, flags = by_hand((0.9, 0.8), 6)
    assert out.extras["klora_gamma"] == pytest.approx(gamma, rel=1e-4)
    assert out.extras["klora_schedule"] == flags
    assert any(any(f) and not all(f) for f in flags.values())  # some layer switches from subject to style
    assert all(f == sorted(f) for f in flags.values())  # pattern s: subject first, then style, once
    rescaled = run(pipe, loras=[LoraSpec(loras["cat"], 0.3), LoraSpec(loras["dog"], 1.6)], method="klora",
                   method_options=STYLE_DOG, steps=6)  # fmt: skip
    assert rescaled.extras["klora_schedule"] == flags


def test_time_is_the_step_index_of_each_run(pipe, loras):
    """Progress is i / steps of the call's own schedule: step 2i of 8 is step i of 4, and a repeated
    call starts over (no counter survives a call)."""
    specs = [LoraSpec(loras["cat"], 0.9), LoraSpec(loras["dog"], 0.8)]
    short = run(pipe, loras=specs, method="klora", method_options=STYLE_DOG, steps=4)
    long = run(pipe, loras=specs, method="klora", method_options=STYLE_DOG, steps=8)
    again = run(pipe, loras=specs, method="klora", method_options=STYLE_DOG, steps=4)
    for name, flags in short.extras["klora_schedule"].items():
        assert len(flags) == 4 and long.extras["klora_schedule"][name][::2] == flags
    assert len(long.extras["klora_style_layers"]) == 8
    schedule = long.extras["klora_schedule"].values()
    assert long.extras["klora_style_layers"] == [sum(flags[i] for flags in schedule) for i in range(8)]
    assert (again.images == short.images).all()


def test_every_layer_output_is_the_base_plus_exactly_one_change(pipe, loras):
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    specs, calls = [LoraSpec(loras["cat"], 0.9), LoraSpec(loras["dog"], 0.8)], []
    run(pipe, loras=specs, method="klora", method_options=STYLE_DOG, steps=1)  # loads the LoRAs into the layer
    pipe.unet.get_submodule(name).register_forward_hook(lambda layer, args, out: calls.append((layer, args[0], out)))
    out = run(pipe, loras=specs, method="klora", method_options=STYLE_DOG, steps=6)
    flags = out.extras["klora_schedule"][name]
    assert any(flags) and not all(flags) and len(calls) == 6
    for (layer, x, y), uses_style in zip(calls, flags):
        chosen, other = ("dog", "cat") if uses_style else ("cat", "dog")
        assert torch.allclose(y, base_projection(layer, x) + lora_delta(layer, chosen, x), atol=1e-6)
        assert not torch.allclose(y, base_projection(layer, x) + lora_delta(layer, other, x), atol=1e-4)


def test_dense_change_honours_alpha_rank_and_weight_and_reads_convolutions(pipe, tmp_path, loras):
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
    down, up = random_lora_layers(pipe, 1)[("unet", name)]
    loha = write_random_adapter(pipe, tmp_path / "loha.safetensors", "LoHa", 1)
    run(pipe, loras=[LoraSpec(loras["cat"]), LoraSpec(loha)], method="merge", steps=1)  # loads both
    activate(pipe.unet, {"cat": 0.7, "loha": 0.5})
    assert torch.allclose(dense_change(pipe.unet.get_submodule(name), "cat"), 0.7 * 8.0 / 4 * up @ down, atol=1e-6)
    conv = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    kernel, x = dense_change(conv, "loha"), torch.randn(2, conv.get_base_layer().in_channels, 9, 7)
    assert torch.allclose(F.conv2d(x, kernel, padding=1), lora_delta(conv, "loha", x), atol=1e-5)


@pytest.mark.parametrize("second", ["same file", "kohya file"])
def test_klora_of_a_lora_with_itself_is_that_lora_alone(pipe, loras, tmp_path, second):
    """Whichever LoRA a layer takes, it is the same change; also from a kohya file of the same weights."""
    other = loras["cat"]
    if second == "kohya file":
        other = write_random_lora(pipe, tmp_path / "cat_kohya.safetensors", 1, fmt="kohya")
    alone = run(pipe, "a sks cat", loras=[LoraSpec(loras["cat"], 0.9)], method="merge").images
    for pattern in ("s", "s*"):
        both = run(pipe, "a sks cat", loras=[LoraSpec(loras["cat"], 0.9, name="a"), LoraSpec(other, 0.9, name="b")],
                   method="klora", method_options={"style_lora": "b", "pattern": pattern})  # fmt: skip
        assert abs(both.images - alone).max() < 1e-6
        assert both.extras["klora_gamma"] == pytest.approx(1.0)


def test_the_style_is_found_by_its_trigger(pipe, loras):
    out = run(pipe, loras=[LoraSpec(loras["cat"]), LoraSpec(loras["dog"])], method="klora",
              method_options={"style_triggers": ["qpl", "zwx"]}, steps=1)  # fmt: skip
    assert out.extras["klora_roles"] == {"content": "cat", "style": "dog"}


@pytest.mark.parametrize(
    "names, options, named",
    [
        (("cat", "dog", "car"), {"style_lora": "dog"}, "one subject LoRA and one style LoRA; got 3"),
        (("cat", "dog"), None, "pass style_lora='<adapter name>' or style_triggers"),
        (("cat", "dog"), {"style_triggers": ["sks", "zwx"]}, "2 of their triggers"),
        (("cat", "dog"), {"style_lora": "qpl"}, "style_lora 'qpl' names none of the LoRAs"),
        (("cat", "dog"), {"pattern": "t"}, "pattern must be 's' or 's\\*'"),
        (("cat", "dog"), {"top_k": 0}, "top_k must be a whole number"),
    ],
)
def test_bad_input_is_named_before_any_unet_call(pipe, loras, names, options, named):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(InvalidOptionError, match=named):
        run(pipe, PROMPT + " and a vrn car", loras=[loras[n] for n in names], method="klora", method_options=options)
    assert calls == []
