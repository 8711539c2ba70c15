"""LoRA files: formats, metadata, and every bad-input error before any denoising."""

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file

from compose import LoraSpec
from compose.errors import (
    ComposeError,
    CorruptLoraFileError,
    DuplicateLoraNameError,
    IncompatibleLoraError,
    InvalidWeightError,
    LoraFileNotFoundError,
    NoLoraKeysError,
    NonFiniteLoraError,
    NotSafetensorsError,
    TruncatedLoraFileError,
)
from compose.loading import PREFERRED_WEIGHT_NAME, inspect_lora_file, resolve_loras, trigger_from_metadata
from compose.saving import save_lora
from pipelines.tiny import random_lora_layers, write_random_lora
from tests.conftest import PROMPT, run
from ui.library import LoraLibrary


def test_trigger_and_concept_read_from_metadata(pipe, loras):
    [lora] = resolve_loras(pipe, [loras["cat"]])
    assert (lora.adapter, lora.trigger, lora.concept) == ("cat", "sks", "cat")
    [overridden] = resolve_loras(pipe, [LoraSpec(loras["cat"], trigger="qqq", concept="kitten")])
    assert (overridden.trigger, overridden.concept) == ("qqq", "kitten")


def test_kohya_tag_frequency_gives_most_frequent_tag():
    tags = {"10_sks": {"sks": 40, "cat": 12}, "reg": {"cat": 20}}
    assert trigger_from_metadata({"ss_tag_frequency": json.dumps(tags)}) == "sks"
    assert trigger_from_metadata({"ss_tag_frequency": "not json"}) is None


def test_kohya_layout_detected_with_text_encoder(loras):
    info = inspect_lora_file(loras["te_kohya"])
    assert info.format == "kohya"
    assert info.components == {"unet", "text_encoder"}
    assert inspect_lora_file(loras["te"]).layers == info.layers


def test_kohya_and_peft_files_of_same_weights_give_same_image(pipe, loras):
    peft_image = run(pipe, loras=[LoraSpec(loras["te"], name="a")]).images
    kohya_image = run(pipe, loras=[LoraSpec(loras["te_kohya"], name="b")]).images
    plain = run(pipe).images
    assert abs(peft_image - plain).max() > 1e-2  # the LoRA does something
    assert abs(peft_image - kohya_image).max() < 1e-5


def test_alpha_scale_kept(pipe, loras):
    resolve = resolve_loras(pipe, [loras["cat"]])
    from compose.loading import load_adapters

    load_adapters(pipe, resolve)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    assert layer.scaling["cat"] == pytest.approx(8.0 / 4)  # alpha 8, rank 4


def test_missing_file(pipe, tmp_path):
    with pytest.raises(LoraFileNotFoundError, match="does not exist"):
        resolve_loras(pipe, [tmp_path / "nope.safetensors"])


def test_folder_with_several_files_asks_for_one(pipe, loras):
    with pytest.raises(LoraFileNotFoundError, match="several"):
        resolve_loras(pipe, [loras["cat"].parent])


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".safetensors"])
def test_pickles_refused_without_unpickling(pipe, tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"x": torch.zeros(1)}, path)  # a zip-based pickle, whatever its name
    with pytest.raises(NotSafetensorsError, match="pickle"):
        resolve_loras(pipe, [path])


def test_corrupt_header(pipe, tmp_path):
    bad_length = tmp_path / "bad_length.safetensors"
    bad_length.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    for path in (bad_length, bad_json):
        with pytest.raises(CorruptLoraFileError, match=path.name):
            resolve_loras(pipe, [path])


def test_no_lora_keys(pipe, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(NoLoraKeysError, match="is a UNet's full weights, not a LoRA"):
        resolve_loras(pipe, [path])


SDXL_TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # wrong shapes for this model
SGM_TO_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # layers this model does not have


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({f"{SDXL_TO_K}.lora_A.weight": (4, 2048), f"{SDXL_TO_K}.lora_B.weight": (64, 4)}, "SDXL"),
        ({f"{SGM_TO_K}.lora_down.weight": (4, 2048), f"{SGM_TO_K}.lora_up.weight": (640, 4)}, "do not exist"),
    ],
)
def test_loras_for_another_model_are_named_so(pipe, tmp_path, tensors, message):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, str(path))
    with pytest.raises(IncompatibleLoraError, match=message):
        resolve_loras(pipe, [path])


def test_names_given_twice_are_refused(pipe, loras):
    with pytest.raises(DuplicateLoraNameError, match="'pet'.*@NAME"):
        resolve_loras(pipe, [LoraSpec(loras["cat"], name="pet"), LoraSpec(loras["dog"], name="pet")])


def test_diffusers_files_of_one_name_are_named_after_their_folders(pipe, tmp_path, loras):
    files = [
        write_random_lora(pipe, tmp_path / folder / PREFERRED_WEIGHT_NAME, seed)
        for folder, seed in (("cat-lora", 1), ("dog", 2), ("other/dog", 3))
    ]
    named = resolve_loras(pipe, [files[0], files[1].parent, files[2], LoraSpec(loras["car"], name="dog_2")])
    assert [lora.adapter for lora in named] == ["cat_lora", "dog", "dog_3", "dog_2"]
    out = run(pipe, "a cat", loras=files, method="composite", steps=1)
    assert [lora.adapter for lora in out.extras["loras"]] == ["cat_lora", "dog", "dog_2"]


def truncated_copy(source, folder):
    """The file cut a little after its header, as a half-finished download leaves it."""
    data = source.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    path = folder / "cut.safetensors"
    path.write_bytes(data[: 8 + header_size + 100])
    return path


def test_truncated_file_is_named_before_loading_and_in_the_ui(pipe, loras, tmp_path):
    cut = truncated_copy(loras["cat"], tmp_path)
    inspect_lora_file(loras["cat"])  # the whole file passes
    with pytest.raises(TruncatedLoraFileError, match=r"cut\.safetensors looks truncated.*download it again"):
        resolve_loras(pipe, [cut])
    library = LoraLibrary([tmp_path], tmp_path / "uploads", pipe=pipe)
    assert "cut" not in library.entries and "truncated" in library.skipped["cut.safetensors"]
    with pytest.raises(TruncatedLoraFileError, match="truncated"):
        library.add_upload(cut, "cut.safetensors")
    assert not list((tmp_path / "uploads").iterdir())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_naming_the_file(pipe, tmp_path, bad):
    layers = random_lora_layers(pipe, seed=1)
    first = next(iter(layers))
    layers[first][1][0, 0] = bad
    path = save_lora(tmp_path / "diverged.safetensors", layers, 4, 4.0)
    with pytest.raises(NonFiniteLoraError, match=r"diverged\.safetensors.*NaN or infinite"):
        run(pipe, "a cat", loras=[path], steps=1)


def test_weights_far_outside_the_usual_range_warn(loras):
    with pytest.warns(UserWarning, match="far outside the usual range"):
        LoraSpec(loras["cat"], weight=1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraSpec(loras["cat"], weight=-2.0)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1", True])
def test_weight_must_be_finite_number(loras, weight):
    with pytest.raises(InvalidWeightError, match="finite"):
        LoraSpec(loras["cat"], weight=weight)


def test_errors_raised_before_any_denoising(pipe, loras, tmp_path):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ComposeError):
        run(pipe, PROMPT, loras=[loras["cat"], tmp_path / "nope.safetensors"])
    assert calls == []


def test_cli_form_of_spec():
    assert (LoraSpec.parse("a/b.safetensors:0.5").source, LoraSpec.parse("a/b.safetensors:0.5").weight) == (
        "a/b.safetensors",
        0.5,
    )
    assert LoraSpec.parse("C:/x.safetensors").weight == 1.0
    named = LoraSpec.parse("a/pytorch_lora_weights.safetensors:0.5@cat_2")
    assert (named.source, named.weight, named.name) == ("a/pytorch_lora_weights.safetensors", 0.5, "cat_2")
    assert (LoraSpec.parse("a/b.safetensors@dog").weight, LoraSpec.parse("a/b.safetensors@dog").name) == (1.0, "dog")
    assert LoraSpec.parse("me@host/b.safetensors").name is None
