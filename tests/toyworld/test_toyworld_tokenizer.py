from toyworld.tokenizer import build_tokenizer
from toyworld.world import WORDS


def test_every_world_word_is_one_token():
    tokenizer = build_tokenizer()
    for word in WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_offsets_point_at_words():
    tokenizer = build_tokenizer()
    prompt = "a zwx circle on the left and an orange square"
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    words = [prompt[a:b] for a, b in encoding.offset_mapping if b > a]
    assert words == prompt.split()
    assert encoding.input_ids[0] == tokenizer.bos_token_id and encoding.input_ids[-1] == tokenizer.eos_token_id


def test_unknown_words_fall_back_to_characters():
    tokenizer = build_tokenizer()
    ids = tokenizer("a Giraffe, 42!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tokenizer.unk_token_id not in ids[1:5]
