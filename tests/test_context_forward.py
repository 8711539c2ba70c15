"""DenoiseContext.predict: the one UNet forward every method uses, and its variants."""

from __future__ import annotations

import torch

from compose.adapters import BASE
from compose.attention.layers import attention_layers
from compose.context import DenoiseContext, Pass
from compose.deep_cache import deep_features
from tests.conftest import generator


def context(pipe, guidance_scale=7.5) -> DenoiseContext:
    ctx = DenoiseContext(
        pipe=pipe, prompt="a cat", negative_prompt="", loras=[], guidance_scale=guidance_scale, guidance_rescale=0.0,
        height=64, width=64, num_images=1, clip_skip=None, cross_attention_kwargs=None,
    )  # fmt: skip
    pipe.scheduler.set_timesteps(2)
    return ctx


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 32, 32, generator=generator(1))


@torch.no_grad()
def test_conditional_half_alone_is_the_cond_of_the_cfg_forward(pipe):
    ctx = context(pipe)
    step, t = Pass(BASE, *ctx.encode("a cat")), pipe.scheduler.timesteps[0]
    [(uncond, cond)] = ctx.predict(latents(), t, [step])
    [(alone_u, alone_c)] = ctx.predict(latents(), t, [step], cond_only=True)
    assert not torch.allclose(uncond, cond)
    torch.testing.assert_close(alone_c, cond, atol=1e-5, rtol=1e-5)
    assert alone_u is alone_c
    assert (ctx.unet_calls, ctx.unet_passes) == (2, 2)


@torch.no_grad()
def test_stop_after_ends_the_forward_right_after_the_last_named_layer(pipe):
    ctx = context(pipe)
    names = [layer.name for layer in attention_layers(pipe.unet)]
    order = []
    for name in names:
        module = pipe.unet.get_submodule(name.removesuffix(".processor"))
        module.register_forward_hook(lambda *_, name=name: order.append(name))
    step, t = Pass(BASE, *ctx.encode("a cat")), pipe.scheduler.timesteps[0]
    ctx.predict(latents(), t, [step])
    full = list(order)
    order.clear()
    wanted = {full[1], full[3]}
    assert ctx.predict(latents(), t, [step], stop_after=wanted) is None
    assert order == full[:4]  # the hooks of the layer that ended the forward ran first
    order.clear()
    ctx.predict(latents(), t, [step])
    assert order == full  # nothing of the cut is left installed


@torch.no_grad()
def test_shallow_pass_on_its_own_deep_feature_is_the_full_pass_and_is_not_counted(pipe):
    ctx = context(pipe)
    step, t = Pass(BASE, *ctx.encode("a cat")), pipe.scheduler.timesteps[0]
    with deep_features(pipe.unet) as captured:
        [full] = ctx.predict(latents(), t, [step])
    [shallow] = ctx.predict(latents(), t, [step], deep_features=captured)
    assert torch.equal(shallow[0], full[0]) and torch.equal(shallow[1], full[1])
    assert ctx.unet_calls == 1


def test_latent_gradient_is_the_gradient_of_the_loss_and_leaves_autograd_off(pipe):
    ctx = context(pipe)
    z = latents()
    with torch.no_grad():
        loss, grad = ctx.latent_gradient(z, lambda leaf: (leaf**2).sum())
        assert not torch.is_grad_enabled()
    assert loss == float((z**2).sum())
    torch.testing.assert_close(grad, 2 * z)
