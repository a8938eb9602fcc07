"""A character-level CLIP tokenizer that needs no download.

CLIP's BPE vocabulary cannot be fetched on offline machines, but a `CLIPTokenizer` whose vocabulary is just
the 256 byte symbols (plus their end-of-word forms) and no merges behaves like CLIP's tokenizer on any text:
same special tokens, same lower-casing and padding, one token per character. The tiny test models and the
embedded demo model use it; real checkpoints bring their own tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def char_vocabulary() -> dict[str, int]:
    """The 514-token vocabulary: 256 byte symbols, their end-of-word forms, BOS and EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # CLIP/GPT-2's reversible byte -> unicode map

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab


def build_char_clip_tokenizer(model_max_length: int = 32) -> CLIPTokenizer:
    """Build the character-level `CLIPTokenizer` (vocabulary size 514, EOS id 513) without any download."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(char_vocabulary(), f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)
