"""TARA training on the tiny SDXL: pooled embeddings and time ids in the training forward, L_align falls."""

from compose.loading import resolve_loras
from compose.training import train_tara
from tests.conftest import run
from tests.sdxl_helpers import pipe  # noqa: F401
from tests.test_tara_training import options, pictures


def test_training_on_sdxl_lowers_alignment_and_the_lora_runs_under_tara(pipe, tmp_path):  # noqa: F811
    out = tmp_path / "sks.safetensors"
    calls = []
    pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    result = train_tara(pipe, [(p, None) for p in pictures(2)], out, options(steps=6), progress=False)
    assert result.align[-1] < 0.8 * result.align[0]
    added = calls[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (1, 32) and added["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]

    [lora] = resolve_loras(pipe, [out])
    assert (lora.trigger, lora.concept) == ("sks", "dog")
    images = run(pipe, "a photo of sks dog", loras=[out], method="tara", steps=2).images
    assert images.shape == (1, 64, 64, 3)
