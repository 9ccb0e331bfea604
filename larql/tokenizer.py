"""Tokenizer: the vindex's `tokenizer.json` through Hugging Face `tokenizers`.

`byte_level_tokenizer` builds a small stand-in (specials + 256 byte tokens) for random demo
and test models, so nothing has to be downloaded to run end to end.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Gemma's special ids: the byte tokens follow them.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def byte_level_tokenizer() -> Tokenizer:
    """A 260-token byte-level tokenizer: ids 0-3 are pad/eos/bos/unk, then one token per byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok
