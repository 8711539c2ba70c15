"""The SDXL pipeline: parent equivalences, two text encoders, added conditions, kohya SDXL files, model families."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open

from compose import LoraSpec
from compose.adapters import snapshot
from compose.attention.layers import attention_layers, layers_near_factor
from compose.context import DenoiseContext
from compose.errors import IncompatibleLoraError
from compose.loading import load_adapters, model_layer_shapes, resolve_loras
from compose.methods import METHODS
from compose.tokens import TokenizerMismatchError, check_tokenizers_agree, token_positions
from compose.unet_names import diffusers_to_original, original_to_diffusers_key
from eval.bench import run_benchmark
from pipelines import MultiLoraPipelineOutput, MultiLoraStableDiffusionXLPipeline
from pipelines.loading import load_pipeline
from pipelines.tiny import tiny_pipeline, tiny_tokenizer, write_random_lora
from tests.conftest import PROMPT, generator, run
from tests.sdxl_helpers import loras, pipe  # noqa: F401

# SDXL base 1.0's UNet config (the parts that shape its layers).
SDXL_UNET = dict(
    sample_size=128, cross_attention_dim=2048, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip


def parent_call(pipe, steps=3, **kwargs):
    return StableDiffusionXLPipeline.__call__(
        pipe, PROMPT, num_inference_steps=steps, generator=generator(0), output_type="np", **kwargs
    ).images


def test_without_loras_exactly_the_parent(pipe):  # noqa: F811
    assert (run(pipe).images == parent_call(pipe)).all()


@pytest.mark.parametrize(
    "conditions",
    [
        {},  # no negative prompt: SDXL's zero negative embeddings
        dict(negative_prompt="a red tree", original_size=(96, 80), crops_coords_top_left=(8, 4), target_size=(64, 64),
             negative_original_size=(32, 32), negative_target_size=(48, 48)),
    ],
)  # fmt: skip
def test_merge_equals_diffusers_set_adapters(pipe, loras, conditions):  # noqa: F811
    """Both text encoders' LoRA parts, pooled embeddings and (negative) time ids as diffusers uses them."""
    out = run(pipe, loras=[LoraSpec(loras["cat"], 0.7), LoraSpec(loras["te"], 1.3)], method="merge", **conditions)
    assert isinstance(out, MultiLoraPipelineOutput) and out.unet_calls == 3
    assert abs(out.images - run(pipe, **conditions).images).max() > 1e-3  # the LoRAs act
    reference = type(pipe).from_pipe(pipe)
    reference.set_adapters(["cat", "te"], [0.7, 1.3])
    expected = parent_call(reference, **conditions)
    assert abs(out.images - expected).max() < 1e-5


def test_every_pass_carries_its_own_pooled_embeds_and_time_ids(pipe, loras):  # noqa: F811
    _, _, pooled, negative_pooled = pipe.encode_prompt(PROMPT, num_images_per_prompt=2, negative_prompt="a tree")
    resolve = resolve_loras(pipe, [loras["te"]])
    load_adapters(pipe, resolve)
    ctx = DenoiseContext(
        pipe=pipe, prompt=PROMPT, negative_prompt="a tree", loras=resolve, guidance_scale=5.0, guidance_rescale=0.0,
        height=64, width=64, num_images=2, clip_skip=None, cross_attention_kwargs=None,
        size_conditions={"original_size": (80, 96)},
    )  # fmt: skip
    base_negative, base = ctx.encode(PROMPT)
    _, with_lora = ctx.encode_for(resolve[0])
    added = ctx.added_conditions([base_negative, base, with_lora])
    assert added["text_embeds"].shape == (6, 32) and added["time_ids"].shape == (6, 6)
    torch.testing.assert_close(added["text_embeds"][:4], torch.cat([negative_pooled, pooled]))
    assert not torch.allclose(added["text_embeds"][4:], pooled)  # the LoRA's text-encoder parts change it
    assert added["time_ids"][0].tolist() == [80.0, 96.0, 0.0, 0.0, 64.0, 64.0]
    with pytest.raises(ValueError, match="DenoiseContext.encode"):
        ctx.added_conditions([base.clone()])


def test_kohya_sdxl_file_equals_diffusers_file(pipe, loras):  # noqa: F811
    with safe_open(str(loras["te_kohya"]), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    diffusers_file = run(pipe, loras=[loras["te"]]).images
    kohya_file = run(pipe, loras=[loras["te_kohya"]]).images
    assert (diffusers_file == kohya_file).all()


def test_text_encoder_2_adapters_restored(pipe, loras):  # noqa: F811
    processors = dict(pipe.unet.attn_processors)
    for method in ("merge", "composite", "tara"):
        run(pipe, loras=[loras["te"], loras["dog"]], method=method, steps=2)
        layers = snapshot([pipe.text_encoder, pipe.text_encoder_2]).layers.values()
        assert layers and all(active == [] for active, _, _ in layers)
        assert dict(pipe.unet.attn_processors) == processors


def test_lora_of_the_other_family_is_refused_before_denoising(pipe, tmp_path):  # noqa: F811
    sd = tiny_pipeline()
    files = {
        "sd": write_random_lora(sd, tmp_path / "sd.safetensors", 1),
        "sd_te": write_random_lora(sd, tmp_path / "sd_te.safetensors", 1, text_encoder=True),
        "xl": write_random_lora(pipe, tmp_path / "xl.safetensors", 1),
        "xl_te": write_random_lora(pipe, tmp_path / "xl_te.safetensors", 1, text_encoder=True, fmt="kohya"),
    }
    calls = []
    for model in (sd, pipe):
        model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    for name in ("sd", "sd_te"):
        with pytest.raises(IncompatibleLoraError, match="an SD 1.x LoRA on an SDXL model"):
            run(pipe, loras=[files[name]])
    for name in ("xl", "xl_te"):
        with pytest.raises(IncompatibleLoraError, match="an SDXL LoRA on an SD 1.x model"):
            run(sd, loras=[files[name]])
    assert calls == []


def test_tokenizers_agree_on_positions_and_must_agree(pipe, loras):  # noqa: F811
    assert pipe.tokenizer_2.pad_token != pipe.tokenizer.pad_token  # as in SDXL: "!" pads the second
    check_tokenizers_agree([pipe.tokenizer, pipe.tokenizer_2], [PROMPT])
    for word in ("sks", "zwx", "dog"):
        assert token_positions(pipe.tokenizer, PROMPT, word) == token_positions(pipe.tokenizer_2, PROMPT, word)
    pipe.tokenizer_2 = tiny_tokenizer(words=["a", "cat"])  # splits "sks" and "dog" into other pieces
    with pytest.raises(TokenizerMismatchError, match="tokenizers"):
        run(pipe, loras=[loras["cat"]], method="tara")


def test_layers_and_names_follow_the_sdxl_config():
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    cross = [layer for layer in attention_layers(unet) if layer.cross]
    assert len(cross) == 70 and {layer.factor for layer in cross} == {2, 4}  # no attention at full resolution
    assert len(layers_near_factor(unet, 4)) == 60  # 1/32 of the image: 2x10 down, 10 mid, 3x10 up
    config = unet.config
    expected = {
        "input_blocks_7_1_transformer_blocks_9_attn2_to_k": "down_blocks_2_attentions_0_"
        "transformer_blocks_9_attn2_to_k",
        "input_blocks_6_0_op": "down_blocks_1_downsamplers_0_conv",
        "middle_block_1_proj_in": "mid_block_attentions_0_proj_in",
        "output_blocks_0_0_skip_connection": "up_blocks_0_resnets_0_conv_shortcut",
        "output_blocks_5_2_conv": "up_blocks_1_upsamplers_0_conv",
        "output_blocks_8_0_emb_layers_1": "up_blocks_2_resnets_2_time_emb_proj",
        "label_emb_0_0": "add_embedding_linear_1",
    }
    assert {key: original_to_diffusers_key(key, config) for key in expected} == expected
    names = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    keys = model_layer_shapes(unet)
    for name in names:  # every layer round-trips through the original layout
        original = diffusers_to_original(name, config).replace(".", "_")
        assert (original_to_diffusers_key(original, config) or original) in keys, name


def test_load_pipeline_by_name_and_from_an_sdxl_folder(pipe, tmp_path):  # noqa: F811
    assert isinstance(load_pipeline("tiny-sdxl"), MultiLoraStableDiffusionXLPipeline)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"  # as a real SDXL folder says
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(str(tmp_path))
    assert isinstance(loaded, MultiLoraStableDiffusionXLPipeline)
    loaded.set_progress_bar_config(disable=True)
    assert (run(loaded, steps=2).images == run(pipe, steps=2).images).all()


def test_benchmark_runs_every_method_on_sdxl(pipe):  # noqa: F811
    rows = run_benchmark(pipe, sorted(METHODS), [2], steps=1, repeats=1)
    assert [row.method for row in rows] == ["single", *sorted(METHODS)]
    assert all(row.error is None and row.unet_calls >= 1 for row in rows), [row.error for row in rows]
