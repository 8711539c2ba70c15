"""Pieces of the base model's training that change what the model learns."""
import torch

from toyworld.tokenizer import build_tokenizer
from toyworld.train_base import hide_padding


def test_hide_padding_replaces_the_end_and_padding_states_of_chosen_rows_only():
    tokenizer = build_tokenizer()
    ids = tokenizer(["a red square", "a blue circle on the left"], padding="max_length",
                    max_length=12, return_tensors="pt").input_ids
    text, empty = torch.randn(2, 12, 5), torch.randn(1, 12, 5)
    out = hide_padding(text, ids, empty, tokenizer.eos_token_id, torch.tensor([True, False]))
    end = ids[0].tolist().index(tokenizer.eos_token_id)
    assert end == 4  # start, a, red, square
    assert torch.equal(out[0, :end], text[0, :end])
    assert torch.equal(out[0, end:], empty[0, end:])
    assert torch.equal(out[1], text[1])
