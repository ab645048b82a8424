"""Prompts for text-conditioned models: prompt sets, the digits phrasings and tokenization.

A text-conditioned denoiser takes token ids ``(N, L)`` as its condition. A :class:`PromptSet`
holds the prompts used to collect calibration trajectories and the prompts used for evaluation,
each optionally with the digit class it names (the bundled ``digits-t2i`` knows them, so
condition accuracy applies; a user's prompts file carries none, so metrics fall back to
comparisons against the full-precision model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffquant.errors import DataError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the number {digit}",
    "the digit {word}",
    "a picture of the number {word}",
    "{word}",
    "{digit}",
    "handwritten digit {digit}",
    "an image of a {word}",
    "a drawing of the digit {digit}",
    "write the number {word}",
    "a small {word}",
    "number {word} written by hand",
)
"""Phrasings ``digits-t2i`` is trained on (and calibrated with)."""

HELD_OUT_TEMPLATES = (
    "a drawing of a handwritten {word}",
    "the handwritten number {digit}",
    "an image of the digit {digit}",
    "digit {word} written by hand",
)
"""Phrasings never seen in training: the evaluation prompts of ``digits-t2i``."""

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


@dataclass(frozen=True)
class Prompt:
    """One prompt and the digit class it names (None when unknown)."""

    text: str
    label: int | None = None


def digit_prompts(templates: Sequence[str]) -> list[Prompt]:
    """Every template filled with every digit, ordered so that prompt ``i`` names digit ``i % 10``."""
    return [Prompt(template.format(word=DIGIT_WORDS[d], digit=d), d) for template in templates for d in range(10)]


def read_prompts_file(path: Path) -> list[Prompt]:
    """Read prompts (one per line; blank lines and ``#`` comments ignored).

    Raises:
        DataError: If the file is missing, unreadable or holds no prompt.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"prompts file {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    prompts = [Prompt(line) for line in lines if line]
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompt; put one prompt per line")
    return prompts


Tokenize = Callable[[list[str]], torch.Tensor]


def hf_tokenize(tokenizer) -> Tokenize:
    """Wrap a transformers tokenizer: pad and truncate to its ``model_max_length``, int64 ids."""

    def tokenize(texts: list[str]) -> torch.Tensor:
        encoded = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return torch.tensor(encoded["input_ids"], dtype=torch.long)

    return tokenize


@dataclass
class PromptSet:
    """Calibration and evaluation prompts of a text-conditioned model, with its tokenizer."""

    calibration: list[Prompt]
    evaluation: list[Prompt]
    tokenize: Tokenize

    def __post_init__(self) -> None:
        """Refuse empty prompt lists."""
        if not self.calibration or not self.evaluation:
            raise DataError("a text-conditioned model needs at least one calibration and one evaluation prompt")

    def _chosen(self, n: int, purpose: str) -> list[Prompt]:
        prompts = self.calibration if purpose == "calibration" else self.evaluation
        return [prompts[i % len(prompts)] for i in range(n)]

    def texts(self, n: int, purpose: str) -> list[str]:
        """The prompt of each of ``n`` samples, as :meth:`conditions` cycles through them."""
        return [p.text for p in self._chosen(n, purpose)]

    def conditions(self, n: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids for ``n`` samples cycling through the prompts, and their labels if known.

        Args:
            n: Number of samples.
            purpose: ``calibration`` or ``evaluation``.

        Returns:
            Token ids ``(n, L)`` and digit labels ``(n,)`` (None unless every prompt has one).
        """
        chosen = self._chosen(n, purpose)
        ids = self.tokenize([p.text for p in chosen])
        if any(p.label is None for p in chosen):
            return ids, None
        return ids, torch.tensor([p.label for p in chosen], dtype=torch.long)


def build_word_tokenizer(texts: Sequence[str], max_length: int):
    """A word-level tokenizer (``tokenizers`` library) over the words of ``texts``.

    Ids 0-3 are ``<pad> <bos> <eos> <unk>``; every encoding is ``<bos> words... <eos>`` padded
    with ``<pad>`` to ``max_length``. Returned as a transformers ``PreTrainedTokenizerFast`` so
    it saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.lower().split()})
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )
