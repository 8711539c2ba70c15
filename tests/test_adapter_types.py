"""LoCon, DoRA, LoHa and LoKr files: each loads to its dense change, every method composes them, others are named."""

import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compose import LoraSpec
from compose.adapters import activate, per_sample_adapters, snapshot
from compose.errors import UnsupportedAdapterTypeError
from compose.loading import inspect_lora_file, load_adapters, resolve_loras
from compose.lora_delta import base_projection, lora_delta
from compose.methods import METHODS
from compose.saving import save_adapter
from pipelines.random_adapters import random_adapter_parts, write_random_adapter
from pipelines.tiny import tiny_pipeline, tiny_sdxl_pipeline, write_random_lora
from tests.conftest import run
from tests.test_methods_shared import SHARED_OPTIONS

PIPELINES = {"SD": tiny_pipeline, "SDXL": tiny_sdxl_pipeline}
FORMATS = [  # (model, kind, writer settings, LoRA weight)
    ("SD", "LoCon", {}, 1.0),
    ("SD", "DoRA", {}, 1.0),
    ("SD", "DoRA", {"fmt": "diffusers"}, 1.0),
    ("SD", "LoHa", {}, 1.0),
    ("SD", "LoHa", {"cp": True}, 0.5),
    ("SD", "LoKr", {}, 1.0),
    ("SD", "LoKr", {"cp": True}, 1.0),
    ("SD", "LoKr", {"full": True}, 0.7),
    ("SDXL", "LoCon", {}, 1.0),
    ("SDXL", "DoRA", {}, 1.0),
    ("SDXL", "LoHa", {"text_encoder": True}, 1.0),
    ("SDXL", "LoKr", {"cp": True}, 1.0),
]


def fresh(model: str):
    pipe = PIPELINES[model](seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dense_change(kind: str, parts: dict, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """W' - W of one layer, written from the formats' definitions (kohya, LyCORIS, the DoRA paper)."""
    alpha = float(parts.get("alpha", torch.tensor(0.0)))
    if kind in ("LoCon", "DoRA"):
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        change = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale * alpha / down.shape[0]
        if kind == "LoCon":
            return change
        adapted = (weight + change).flatten(1)
        magnitude = parts["dora_scale"].flatten()
        return (magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)).reshape(weight.shape) - weight
    if kind == "LoHa":
        if "hada_t1" in parts:  # CP: W[o, i, k, l] = sum t[a, b, k, l] w_a[a, o] w_b[b, i]
            first = torch.einsum("abkl,ao,bi->oikl", parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
            second = torch.einsum("abkl,ao,bi->oikl", parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
            rank = parts["hada_t1"].shape[0]
        else:
            first = parts["hada_w1_a"] @ parts["hada_w1_b"]
            second = parts["hada_w2_a"] @ parts["hada_w2_b"]
            rank = parts["hada_w1_b"].shape[0]
        return (first * second).reshape(weight.shape) * scale * alpha / rank
    w1 = parts["lokr_w1"]
    if "lokr_w2" in parts:  # two full factors: LyCORIS ignores alpha
        w2, factor = parts["lokr_w2"], 1.0
    elif "lokr_t2" in parts:
        w2 = torch.einsum("abkl,ao,bi->oikl", parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        factor = alpha / parts["lokr_t2"].shape[0]
    else:
        w2, factor = parts["lokr_w2_a"] @ parts["lokr_w2_b"], alpha / parts["lokr_w2_b"].shape[0]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(weight.shape) * scale * factor


@pytest.mark.parametrize(("model", "kind", "settings", "weight"), FORMATS, ids=lambda v: str(v))
def test_each_format_loads_to_its_dense_change_applied_by_hand(tmp_path, model, kind, settings, weight):
    pipe = fresh(model)
    path = write_random_adapter(pipe, tmp_path / f"{kind}.safetensors", kind, seed=5, **settings)
    assert inspect_lora_file(path).adapter_type == kind
    composed = run(pipe, "a sks cat", loras=[LoraSpec(path, weight)], method="merge").images

    by_hand = fresh(model)
    settings = {k: v for k, v in settings.items() if k != "fmt"}
    with torch.no_grad():
        for (component, name), parts in random_adapter_parts(by_hand, kind, seed=5, **settings).items():
            layer = getattr(by_hand, component).get_submodule(name)
            layer.weight += dense_change(kind, parts, layer.weight, weight)
    expected = run(by_hand, "a sks cat").images
    assert np.abs(composed - run(fresh(model), "a sks cat").images).max() > 1e-2  # the file does something
    assert np.abs(composed - expected).max() < 1e-4


def typed_adapters_on_one_layer(tmp_path):
    """A pipeline with a LoHa, a LoKr, a DoRA and a plain LoRA on the same layers (nested peft layers)."""
    pipe = fresh("SD")
    files = {kind: write_random_adapter(pipe, tmp_path / f"{kind}.safetensors", kind, seed=i) for i, kind in enumerate(["LoHa", "LoKr", "DoRA"])}
    files["LoRA"] = write_random_lora(pipe, tmp_path / "plain.safetensors", 9)
    loras = resolve_loras(pipe, [LoraSpec(path, name=kind) for kind, path in files.items()])
    load_adapters(pipe, loras)
    return pipe


@pytest.mark.parametrize("name", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"])
def test_each_adapters_change_is_its_layer_output_with_it_alone(tmp_path, name):
    pipe = typed_adapters_on_one_layer(tmp_path)
    layer = pipe.unet.get_submodule(name)
    x = torch.randn(2, 77, 64) if "to_q" in name else torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        for adapter in ("LoHa", "LoKr", "DoRA", "LoRA"):
            if "conv" in name and adapter == "LoRA":
                continue  # plain LoRAs adapt attention only
            activate(pipe.unet, {adapter: 0.8})
            alone = layer(x) - base_projection(layer, x)
            activate(pipe.unet, {})
            torch.testing.assert_close(lora_delta(layer, adapter, x), alone, atol=1e-5, rtol=1e-4)


def test_per_sample_batch_gives_each_sample_its_own_adapter(tmp_path):
    pipe = typed_adapters_on_one_layer(tmp_path)
    sample, t, text = torch.randn(1, 4, 32, 32), torch.tensor(500), torch.randn(1, 77, 32)
    names = ["LoHa", "LoKr", "DoRA", "LoRA", "__base__"]
    with torch.no_grad():
        alone = []
        for name in names:
            activate(pipe.unet, {} if name == "__base__" else {name: 1.0})
            alone.append(pipe.unet(sample, t, text).sample)
        activate(pipe.unet, {"LoHa": 1.0, "LoKr": 1.0})  # active LoHa/LoKr layers must not leak into other samples
        with per_sample_adapters(pipe.unet, names):
            batched = pipe.unet(sample.repeat(5, 1, 1, 1), t, text.repeat(5, 1, 1)).sample
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)


def three_types(tmp_path, pipe):
    """A LoHa, a LoKr and a plain LoRA side by side, with triggers, concept words and boxes."""
    thirds = [(0, 0, 1, 1 / 3), (0, 1 / 3, 1, 2 / 3), (0, 2 / 3, 1, 1)]
    return [
        LoraSpec(write_random_adapter(pipe, tmp_path / "loha.safetensors", "LoHa", 1), trigger="sks", concept="cat", region=thirds[0]),
        LoraSpec(write_random_adapter(pipe, tmp_path / "lokr.safetensors", "LoKr", 2), trigger="zwx", concept="dog", region=thirds[1]),
        LoraSpec(write_random_lora(pipe, tmp_path / "plain.safetensors", 3), trigger="vrn", concept="car", region=thirds[2]),
    ]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_composes_a_loha_and_a_lokr_beside_a_plain_lora(tmp_path, pipe, method):
    prompt = "a sks cat and a zwx dog and a vrn car"
    before = run(pipe, prompt, steps=2).images
    specs = three_types(tmp_path, pipe)[: 2 if method == "klora" else 3]  # klora: the LoHa subject, the LoKr style
    out = run(pipe, prompt, loras=specs, method=method, method_options=SHARED_OPTIONS.get(method), steps=2)
    assert np.isfinite(out.images).all() and np.abs(out.images - before).max() > 1e-3
    state = snapshot([pipe.unet, pipe.text_encoder])
    assert all(active == [] and not disabled for active, disabled, _ in state.layers.values())
    assert (run(pipe, prompt, steps=2).images == before).all()


def test_composite_batched_equals_one_pass_per_adapter_type(tmp_path, pipe):
    loras = [*three_types(tmp_path, pipe), LoraSpec(write_random_adapter(pipe, tmp_path / "dora.safetensors", "DoRA", 4))]
    prompt = "a sks cat and a zwx dog and a vrn car"
    batched = run(pipe, prompt, loras=loras, method="composite").images
    sequential = run(pipe, prompt, loras=loras, method="composite", method_options={"batched": False}).images
    assert np.abs(batched - sequential).max() < 1e-5


def kohya_file(path, parts: dict[str, torch.Tensor]):
    save_file({f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.{k}": v for k, v in parts.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("parts", "named"),
    [
        ({"weight": torch.ones(64), "on_input": torch.tensor(False)}, "is an IA3 file"),
        ({"diff": torch.zeros(64, 32), "diff_b": torch.zeros(64)}, r"is a full fine-tune difference \(LyCORIS 'full'\) file"),
        ({"oft_blocks": torch.zeros(4, 16, 16), "alpha": torch.tensor(1.0)}, "is an OFT file"),
    ],
)
def test_unsupported_adapter_types_are_named_before_anything_loads(pipe, tmp_path, parts, named):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedAdapterTypeError, match=named):
        run(pipe, loras=[kohya_file(tmp_path / "other.safetensors", parts)], method="merge")
    assert calls == []


def test_a_file_mixing_loha_and_lokr_layers_is_refused(pipe, tmp_path):
    loha = write_random_adapter(pipe, tmp_path / "loha.safetensors", "LoHa", 1)
    tensors = load_file(str(loha))
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1"] = torch.zeros(4, 4)
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2"] = torch.zeros(8, 8, 3, 3)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.hada")}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(UnsupportedAdapterTypeError, match="mixes LoHa and LoKr layers"):
        resolve_loras(pipe, [tmp_path / "mixed.safetensors"])


def test_dora_with_input_axis_magnitude_is_refused(pipe, tmp_path):
    parts = random_adapter_parts(pipe, "DoRA", 1)
    for layer in parts.values():  # older LyCORIS (wd_on_out=False): one magnitude per input channel
        down = layer["lora_down.weight"]
        layer["dora_scale"] = torch.ones(1, down.shape[1], *(1,) * (down.ndim - 2))
    path = save_adapter(tmp_path / "dora_in.safetensors", parts, fmt="kohya")
    with pytest.raises(UnsupportedAdapterTypeError, match="magnitude over input features"):
        run(pipe, loras=[path], method="merge")


def test_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    path = tmp_path / "lucky.safetensors"
    for padding in range(300):
        layer = {"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "lora_unet_x.lora_up.weight": torch.zeros(1, 1)}
        save_file(layer, str(path), metadata={"pad": "p" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert inspect_lora_file(path).adapter_type == "LoRA"
