"""TARA training on the tiny pipeline: masked k/v updates, L_align, the saved file, resume, inference with it."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from compose import InvalidOptionError, TriggerNotInPromptError
from compose.attention.layers import attention_layers
from compose.attention.token_mask import positions_mask
from compose.lora_delta import base_projection
from compose.loading import load_adapters, resolve_loras
from compose.training import TaraTrainingOptions, train_tara
from compose.training.cli import register
from compose.training.tara import checkpoint_dir, training_adapter
from tests.conftest import run


def pictures(count: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def options(**changes) -> TaraTrainingOptions:
    return TaraTrainingOptions(**{"rare_token": "sks", "class_word": "dog", "lr": 1e-3, "steps": 2, **changes})


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, picture in enumerate(pictures(2)):
        Image.fromarray(picture).save(folder / f"{index}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_training_lowers_alignment_and_saves_a_loadable_lora(pipe, tmp_path):
    out = tmp_path / "sks.safetensors"
    result = train_tara(pipe, [(p, None) for p in pictures(2)], out, options(steps=6), progress=False)
    assert result.steps == 6 and len(result.align) == 6
    assert result.align[-1] < 0.8 * result.align[0]
    with safe_open(str(out), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["loracompose.trigger"] == "sks" and metadata["loracompose.concept"] == "dog"
    assert all(key.startswith("unet.") and ".lora_" in key for key in keys)  # LoRA weights only
    assert any(".attn2.to_k." in key for key in keys) and any(".attn1.to_out.0." in key for key in keys)

    [lora] = resolve_loras(pipe, [out])
    assert (lora.trigger, lora.concept, lora.has_text_encoder) == ("sks", "dog", False)
    load_adapters(pipe, [lora])
    layer = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    assert layer.scaling[lora.adapter] == pytest.approx(32 / 8)  # alpha / rank kept


def test_trained_file_runs_through_tara_inference_without_flags(pipe, tmp_path):
    out = tmp_path / "dog.safetensors"
    train_tara(pipe, [(p, "a photo of sks dog") for p in pictures(1)], out, options(steps=2), progress=False)
    base = run(pipe, "a photo of sks dog on the left").images
    images = run(pipe, "a photo of sks dog on the left", loras=[out], method="tara").images
    assert np.isfinite(images).all() and abs(images - base).max() > 0
    with pytest.raises(TriggerNotInPromptError, match="sks"):
        run(pipe, "a photo of a dog", loras=[out], method="tara")


def test_kv_updates_on_other_tokens_are_exactly_zero(pipe):
    with training_adapter(pipe.unet, options()) as (params, alignment):
        for name, p in params.items():
            if "lora_B" in name:
                torch.nn.init.normal_(p)  # B starts at zero; make the delta visible
        name = next(layer.name for layer in attention_layers(pipe.unet) if layer.cross)
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        context = torch.randn(2, 77, 32)
        rare = torch.stack([positions_mask([4], 77), positions_mask([2, 3], 77)])
        alignment.start(rare, torch.stack([positions_mask([5], 77)] * 2))
        keys, values = pipe.unet.attn_processors[name].project_kv(attn, context)
        base_keys, base_values = base_projection(attn.to_k, context), base_projection(attn.to_v, context)
        other = rare == 0
        assert torch.equal(keys[other], base_keys[other]) and torch.equal(values[other], base_values[other])
        assert not torch.equal(keys[~other], base_keys[~other])
        assert len(alignment.losses) == 1
        keys.sum().backward()
        [grad] = [p.grad for n, p in params.items() if n.startswith(name.removesuffix("processor") + "to_k.lora_B")]
        assert grad is not None and grad.abs().sum() > 0


def test_plain_training_updates_kv_at_every_token_without_alignment(pipe, tmp_path):
    with training_adapter(pipe.unet, options(token_mask=False)) as (params, alignment):
        name = next(layer.name for layer in attention_layers(pipe.unet) if layer.cross)
        assert not hasattr(pipe.unet.attn_processors[name], "project_kv")  # diffusers' own processor
    out = tmp_path / "plain.safetensors"
    result = train_tara(pipe, [(p, "a photo of sks") for p in pictures(2)], out, options(token_mask=False, steps=3), progress=False)
    assert result.align == [0.0, 0.0, 0.0]  # no class word needed: no alignment loss
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["loracompose.method"] == "any"
    base = run(pipe, "a photo of a sks dog").images
    assert abs(run(pipe, "a photo of a sks dog", loras=[out], method="merge").images - base).max() > 0


def test_locon_trains_the_resnet_convolutions_and_loads_them_as_trained(pipe, tmp_path):
    """The file's conv and linear deltas, added to the weights by hand, give the image `merge` gives."""
    locon, attention = tmp_path / "locon.safetensors", tmp_path / "attention.safetensors"
    data = [(p, "a photo of sks") for p in pictures(2)]
    for out, layers in ((locon, "locon"), (attention, "attention")):
        train_tara(pipe, data, out, options(token_mask=False, steps=3, rank=4, alpha=8.0, lr=1e-2, layers=layers), progress=False)
    with safe_open(str(attention), "pt") as handle:
        assert not any(".resnets." in key or ".ff." in key for key in handle.keys())
    with safe_open(str(locon), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    convs = [key for key in tensors if ".resnets." in key and ".conv1.lora_A." in key]
    assert convs and tensors[convs[0]].shape[2:] == (3, 3)
    assert any(".ff.net.2.lora_A." in key for key in tensors) and any(".proj_in.lora_A." in key for key in tensors)

    prompt = "a photo of a sks dog"
    merged = run(pipe, prompt, loras=[locon], method="merge").images
    state = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    try:
        with torch.no_grad():
            for key in (key for key in tensors if ".lora_A." in key):
                down, up = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
                delta = torch.einsum("or,ri...->oi...", up.flatten(1), down) * (8.0 / 4)
                weight = pipe.unet.get_submodule(key.removeprefix("unet.").split(".lora_A.")[0]).weight
                weight += delta.reshape(weight.shape)
            by_hand = run(pipe, prompt).images
    finally:
        pipe.unet.load_state_dict(state)
    assert abs(merged - run(pipe, prompt).images).max() > 1e-2  # the LoRA changes the image
    np.testing.assert_allclose(merged, by_hand, atol=2e-4)


def test_training_leaves_the_pipeline_as_it_was(pipe, tmp_path):
    weights = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    trainable = [p.requires_grad for p in pipe.unet.parameters()]
    before = run(pipe, "a photo of sks dog").images
    train_tara(pipe, [(p, None) for p in pictures(1)], tmp_path / "x.safetensors", options(steps=1), progress=False)
    assert pipe.unet.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[name]) for name, value in pipe.unet.state_dict().items())
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
    assert [p.requires_grad for p in pipe.unet.parameters()] == trainable and not pipe.unet.training
    assert (run(pipe, "a photo of sks dog").images == before).all()


def test_resume_continues_exactly(pipe, image_folder, tmp_path):
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    train_tara(pipe, image_folder, straight, options(steps=4, checkpoint_every=2), progress=False)
    train_tara(pipe, image_folder, resumed, options(steps=2, checkpoint_every=2), progress=False)
    record_path = checkpoint_dir(resumed) / "state.json"  # made before the layers option existed: its default
    record = json.loads(record_path.read_text())
    del record["options"]["layers"]
    record_path.write_text(json.dumps(record))
    result = train_tara(pipe, image_folder, resumed, options(steps=4, checkpoint_every=2), resume=True, progress=False)
    assert result.steps == 4 and len(result.mse) == 2
    with safe_open(str(straight), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())
    with pytest.raises(InvalidOptionError, match="rank"):
        train_tara(pipe, image_folder, resumed, options(steps=5, rank=4), resume=True, progress=False)
    with pytest.raises(InvalidOptionError, match="layers"):
        train_tara(pipe, image_folder, resumed, options(steps=5, layers="locon"), resume=True, progress=False)


def test_bad_training_input_fails_before_training(pipe, tmp_path):
    data = [(p, None) for p in pictures(1)]
    with pytest.raises(TriggerNotInPromptError, match="sks"):
        train_tara(pipe, [(pictures(1)[0], "a photo of a dog")], tmp_path / "a.safetensors", options(), progress=False)
    with pytest.raises(InvalidOptionError, match="class word 'dog'"):
        train_tara(pipe, [(pictures(1)[0], "a photo of sks")], tmp_path / "a.safetensors", options(), progress=False)
    with pytest.raises(InvalidOptionError, match="multiple of"):
        train_tara(pipe, data, tmp_path / "a.safetensors", options(steps=1, resolution=42), progress=False)
    with pytest.raises(InvalidOptionError, match="no .png/.jpg"):
        train_tara(pipe, tmp_path, tmp_path / "a.safetensors", options(steps=1), progress=False)
    with pytest.raises(InvalidOptionError, match="steps"):
        options(steps=0)
    with pytest.raises(InvalidOptionError, match="layers must be one of attention, transformer, locon"):
        options(layers="everything")
    assert not (tmp_path / "a.safetensors").exists()


def test_command_line(image_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(
        ["train-tara", "--model", "tiny", "--images", str(image_folder), "--rare-token", "zwx",
         "--class-word", "dog", "--out", str(out), "--steps", "2", "--rank", "4", "--alpha", "8"]
    )  # fmt: skip
    assert args.run(args) == 0
    assert "after 2 steps" in capsys.readouterr().out
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["loracompose.trigger"] == "zwx"
        assert handle.get_tensor(next(k for k in handle.keys() if "lora_A" in k)).shape[0] == 4
