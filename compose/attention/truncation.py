"""Ending a UNet forward early, once the attention layers whose maps a loss reads have run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator


class ForwardTruncated(Exception):
    """Raised once every wanted layer ran: the rest of the UNet forward is not needed."""


@contextmanager
def stop_after(unet, layer_names: Iterable[str]) -> Iterator[None]:
    """Within the block, a UNet forward raises ForwardTruncated right after the last of these layers ran.

    layer_names are processor names (as in `unet.attn_processors`); an empty set stops nothing.
    """
    wanted, ran = frozenset(layer_names), set()

    def finished(name):
        def hook(_module, _args, _output):
            ran.add(name)
            if wanted <= ran:
                ran.clear()
                raise ForwardTruncated

        return hook

    handles = [
        unet.get_submodule(name.removesuffix(".processor")).register_forward_hook(finished(name)) for name in wanted
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
