"""The offline tokenizer: round trip, special tokens, chat template, determinism, save/load."""

import pytest
from transformers import AutoTokenizer

from qoq.models.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_round_trip_of_response_format_and_unicode(tok):
    text = (
        "<think>Opacity in the left lower lobe; 12 µV, Ödem.</think>\n```json\n"
        '[{"bbox_2d": [10, 20, 30, 40], "label": "Lung Opacity"}]\n```\n\\boxed{Lung Opacity, Edema}'
    )
    assert tok.decode(tok(text)["input_ids"]) == text


def test_special_tokens_are_single_ids(tok):
    assert len(tok) == 512
    ids = tok("<|im_start|>user\nhi<|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-2:] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert sorted(tok.all_special_ids) == [0, 1, 2]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_builtin_corpus_makes_format_words_compact(tok):
    # learned merges: the response format's words are single tokens
    for word in ("think", "boxed", "bbox", "label", "json"):
        assert len(tok(word)["input_ids"]) == 1, word


def test_chat_template_is_chatml(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q <image>"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ <image><|im_end|>\n<|im_start|>assistant\n"
    )
    messages.append({"role": "assistant", "content": "A"})
    assert tok.apply_chat_template(messages, tokenize=False).endswith("<|im_start|>assistant\nA<|im_end|>\n")


def test_deterministic_and_extra_corpus_is_used(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    word = "zqxjvkw"
    with_extra = build_tokenizer(extra_corpus=[f"{word} {word} {word}"] * 50)
    assert len(with_extra(word)["input_ids"]) < len(tok(word)["input_ids"])


def test_too_small_vocab_raises():
    with pytest.raises(ValueError, match="at least 259"):
        build_tokenizer(vocab_size=100)


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Is there a <ecg> abnormality? \\boxed{atrial fibrillation}"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    messages = [{"role": "user", "content": text}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
