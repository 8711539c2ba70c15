"""Token positions from offsets and region masks at any resolution."""

import pytest
import torch

from compose.errors import InvalidRegionError, TriggerNotInPromptError
from compose.regions import Box, as_region, check_region_fits, region_mask
from compose.tokens import require_word, token_positions
from pipelines.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_single_token_word(tokenizer):
    # BOS at 0: "a"=1 "sks"=2 "cat"=3
    assert token_positions(tokenizer, "a sks cat", "sks") == [2]


def test_multi_token_word_and_repeats(tokenizer):
    # "vrn" is not in the vocabulary: spelled v, r, n after BOS and "a"
    assert token_positions(tokenizer, "a vrn cat", "vrn") == [2, 3, 4]
    assert token_positions(tokenizer, "a vrn, cat", "vrn") == [2, 3, 4]
    assert token_positions(tokenizer, "a sks cat and a sks dog", "sks") == [2, 7]


def test_whole_words_only_and_case(tokenizer):
    assert token_positions(tokenizer, "a sksx cat", "sks") == []
    assert token_positions(tokenizer, "A SKS cat", "sks") == [2]


def test_truncated_tokens_not_returned(tokenizer):
    prompt = "a " * 80 + "sks"
    assert token_positions(tokenizer, prompt, "sks") == []
    with pytest.raises(TriggerNotInPromptError, match="'sks'"):
        require_word(tokenizer, prompt, "sks", "cat")


def test_box_masks_and_partition():
    left, right = Box(0, 0, 1, 0.5), Box(0, 0.5, 1, 1)
    for size in [(4, 4), (5, 7), (16, 16)]:
        total = region_mask(left, *size) + region_mask(right, *size)
        assert total.min() >= 1  # together they cover the image
    assert region_mask(left, 4, 4)[:, :2].sum() == 8 and region_mask(left, 4, 4)[:, 2:].sum() == 0


def test_tiny_box_keeps_one_pixel_but_fit_check_refuses():
    box = Box(0.1, 0.1, 0.12, 0.12)
    assert region_mask(box, 4, 4).sum() == 1
    with pytest.raises(InvalidRegionError, match="smaller than one pixel"):
        check_region_fits(box, 4, 4, "LoRA cat")


@pytest.mark.parametrize("box", [(0, 0, 1.2, 1), (0.5, 0, 0.5, 1), (0, 0.6, 1, 0.4), (0, 0, float("nan"), 1)])
def test_bad_boxes(box):
    with pytest.raises(InvalidRegionError):
        as_region(box)


def test_mask_image_region_resized():
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    region = as_region(mask.numpy())
    assert torch.equal(region_mask(region, 4, 4)[:, 2:], torch.ones(4, 2))
    with pytest.raises(InvalidRegionError, match="empty"):
        as_region(torch.zeros(8, 8))
