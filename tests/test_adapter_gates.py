"""Per-pixel adapter gates: region masks follow each layer's grid, and skipped layers get no hook."""
import torch

from compose import LoraSpec
from compose.adapter_gates import RegionGates, add_gated_changes
from compose.adapters import activate, tuner_layers
from compose.loading import load_adapters, resolve_loras
from compose.regions import Box, region_mask

LATENT = (32, 32)


def left_half_gates(pipe):
    mask = region_mask(Box(0.0, 0.0, 1.0, 0.5), *LATENT)
    return RegionGates(pipe.unet, LATENT, torch.stack([mask, 1 - mask])[:, None], halves=2)


def test_gates_follow_each_grid_for_feature_maps_and_tokens(pipe):
    gates = left_half_gates(pipe)
    assert sorted(gates.grids.values()) == [(16, 16), (32, 32)]  # the latent and the tiny UNet's attention grid
    for h, _ in gates.grids.values():
        feature = gates(0, torch.zeros(4, 3, h, h))
        tokens = gates(1, torch.zeros(4, h * h, 5))
        assert feature.shape == (2, 1, h, h) and tokens.shape == (2, h * h, 1)
        assert torch.equal(feature[:, 0, :, : h // 2], torch.ones(2, h, h // 2))
        assert torch.equal(feature[:, 0, :, h // 2 :], torch.zeros(2, h, h // 2))
        torch.testing.assert_close(feature.flatten(1) + tokens[..., 0], torch.ones(2, h * h))  # they partition
    assert gates(0, torch.zeros(4, 7)) is None  # time embeddings stay ungated


def test_skipped_layers_get_no_hook_and_the_others_one(pipe, loras):
    load_adapters(pipe, resolve_loras(pipe, [LoraSpec(loras["cat"])]))
    activate(pipe.unet, {})
    held = [name for name, layer in pipe.unet.named_modules() if layer in tuner_layers(pipe.unet)]
    skipped = {name for name in held if ".attn2." in name}
    hooks = add_gated_changes(pipe.unet, ["cat"], left_half_gates(pipe), skip=skipped)
    try:
        hooked = {name for name in held if pipe.unet.get_submodule(name)._forward_hooks}
    finally:
        for hook in hooks:
            hook.remove()
    assert skipped and hooked == set(held) - skipped
    assert not any(pipe.unet.get_submodule(name)._forward_hooks for name in held)
