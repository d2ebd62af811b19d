"""A word-level tokenizer for the mini CLIP, built with `tokenizers` and saved as a
`PreTrainedTokenizerFast`.

Special ids are chosen for Hugging Face CLIP's text pooling: the model pools at the first
`eos_token_id` in each sequence, except that `eos_token_id == 2` selects a legacy rule (pool at
the highest id). So pad=0, unk=1, bos=2 and eos=3: eos is never 2, and padding (0) never
matches eos.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits out


def words_of(texts: Iterable[str]) -> set[str]:
    """The lower-cased words and punctuation runs of `texts`, as the tokenizer will split them."""
    return {w for t in texts for w in _WORD.findall(t.lower())}


def build_tokenizer(texts: Iterable[str], *, max_length: int):
    """A PreTrainedTokenizerFast whose vocabulary is every word of `texts`, in sorted order after the
    special tokens; it wraps each text as <bos> words <eos>."""
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words_of(texts)):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length, padding_side="right", truncation_side="right")
