"""Two genuinely different tokenizers, trained offline in the test process with the ``tokenizers`` library: a
byte-level BPE (GPT-2 style, spaces inside tokens as ``Ġ``) and a WordPiece (BERT style, whitespace dropped,
continuations as ``##``, a BOS it adds itself). Nothing is downloaded."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "naïve café — déjà vu",
    "tokenisation  is   fun",
    "unbelievably long words are split",
    "a cat and a dog",
]


@lru_cache(maxsize=None)
def _bpe(vocab: int, corpus: tuple[str, ...]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) * 3, trainer)
    return tok


@lru_cache(maxsize=None)
def _wordpiece(vocab: int, corpus: tuple[str, ...]) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[BOS]"],
                                        show_progress=False)
    tok.train_from_iterator(list(corpus) * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return tok


def byte_bpe(vocab: int = 300, corpus=CORPUS) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(vocab, tuple(corpus)), pad_token="<pad>", eos_token="<eos>")


def wordpiece(vocab: int = 150, corpus=CORPUS) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_wordpiece(vocab, tuple(corpus)), pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]")
