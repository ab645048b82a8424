"""Prompt sets and the word-level tokenizer of text-conditioned models."""

from __future__ import annotations

import pytest
import torch

from diffquant.errors import DataError
from diffquant.models.prompts import (
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    Prompt,
    PromptSet,
    build_word_tokenizer,
    digit_prompts,
    hf_tokenize,
    read_prompts_file,
)


def test_digit_prompts_name_digit_i_mod_10():
    prompts = digit_prompts(TRAIN_TEMPLATES)
    assert len(prompts) == 10 * len(TRAIN_TEMPLATES)
    for i, prompt in enumerate(prompts):
        assert prompt.label == i % 10
        assert DIGIT_WORDS[prompt.label] in prompt.text or str(prompt.label) in prompt.text.split()


def test_held_out_phrasings_are_new_sentences_of_known_words():
    train = {p.text for p in digit_prompts(TRAIN_TEMPLATES)}
    held = [p.text for p in digit_prompts(HELD_OUT_TEMPLATES)]
    assert not train & set(held)
    vocabulary = {word for text in train for word in text.split()}
    assert all(word in vocabulary for text in held for word in text.split())


def test_word_tokenizer_frames_pads_and_lowercases():
    tokenizer = build_word_tokenizer(["a handwritten seven", "the number 7"], max_length=6)
    ids = hf_tokenize(tokenizer)(["A handwritten SEVEN", "", "the number 7 unknownword x y z"])
    assert ids.shape == (3, 6) and ids.dtype == torch.long
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids[0].tolist()[:5] == [bos, *tokenizer.convert_tokens_to_ids(["a", "handwritten", "seven"]), eos]
    assert ids[0, 5] == pad
    assert ids[1].tolist() == [bos, eos, pad, pad, pad, pad]
    assert tokenizer.unk_token_id in ids[2].tolist() and ids[2, 0] == bos  # truncated to 6, unknown word kept as unk


def test_prompt_set_labels_only_when_every_prompt_has_one():
    tokenize = hf_tokenize(build_word_tokenizer(["one two"], 4))
    labelled = PromptSet([Prompt("one", 1), Prompt("two", 2)], [Prompt("two", 2)], tokenize)
    ids, labels = labelled.conditions(5, "calibration")
    assert ids.shape == (5, 4) and labels.tolist() == [1, 2, 1, 2, 1]
    assert labelled.conditions(3, "evaluation")[1].tolist() == [2, 2, 2]
    free = PromptSet([Prompt("one"), Prompt("two", 2)], [Prompt("one")], tokenize)
    assert free.conditions(4, "calibration")[1] is None
    with pytest.raises(DataError, match="at least one"):
        PromptSet([], [Prompt("one")], tokenize)


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na red fox\n\n  an astronaut riding a horse  # trailing comment\n")
    assert [p.text for p in read_prompts_file(path)] == ["a red fox", "an astronaut riding a horse"]
    assert all(p.label is None for p in read_prompts_file(path))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="cannot be read"):
        read_prompts_file(tmp_path / "missing.txt")
