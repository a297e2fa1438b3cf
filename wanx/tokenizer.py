"""Prompt cleaning and tokenisation as Wan does it for its umT5-XXL text encoder.

Wan (`wan/modules/tokenizers.py`, `clean='whitespace'`) repairs the text with ftfy,
unescapes HTML entities twice (prompts scraped from the web are often escaped twice, as
in `&amp;amp;`), collapses every run of whitespace to one space and strips the ends;
then it tokenises with the `google/umt5-xxl` tokenizer, which appends `</s>`, padding to
512 tokens with a mask and truncating longer prompts (the `</s>` stays last).
"""
from __future__ import annotations

import html
import os
import re
import unicodedata

import torch

TEXT_LEN = 512

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Wan's prompt cleaning: ftfy.fix_text, html.unescape twice, whitespace collapse, strip."""
    import ftfy

    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


# Characters that render as nothing but are letters or symbols to Unicode: the Hangul fillers and
# the blank braille pattern (common padding in "invisible" text).
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible_text(text: str) -> str:
    """`text` without what renders as nothing: whitespace, control and format characters
    (zero-width spaces, joiners, BOMs), combining marks with no base (variation selectors, the
    grapheme joiner) and the blank letters above."""
    kept = [ch for ch in text if not ch.isspace() and ch not in BLANK_CHARACTERS
            and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp")]
    if all(unicodedata.category(ch) in ("Mn", "Me") for ch in kept):
        return ""
    return "".join(kept)


def load_tokenizer(folder: str | os.PathLike):
    """The umT5 tokenizer from a local folder (e.g. `Wan2.2-T2V-A14B/google/umt5-xxl`), offline."""
    from transformers import AutoTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder!r} (expected the google/umt5-xxl folder)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts: list[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenise prompts the way Wan does.

    Returns:
        (ids, mask): int64 [B, text_len] each; ids end with `</s>` then `<pad>` (id 0);
        mask is 1 on the real tokens (the `</s>` included), so an empty prompt has length 1.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    cleaned = [clean_text(p) for p in prompts]
    batch = tokenizer(cleaned, padding="max_length", truncation=True, max_length=text_len,
                      add_special_tokens=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def build_tiny_tokenizer():
    """A small umT5-like tokenizer built in code (no download), for tests and the CPU demo.

    Same pipeline as umT5's: a Unigram model, split on whitespace with `▁` marking word
    starts, `</s>` appended; ids 0/1/2 are `<pad>`/`</s>`/`<unk>` as in umT5. Its
    vocabulary is every printable ASCII character, a few accented letters and some common
    words (whole-word pieces score higher, so they win over spelling out); anything else
    becomes `<unk>`.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ("a the of and in on with to is video man woman dog cat car red blue green make "
             "turn into change replace style background sky snow night day").split()
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "éèàâêîôïüöñç’"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in words]
    vocab += [("▁" + c, -8.0) for c in chars]
    vocab += [(c, -9.0) for c in chars]

    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=TEXT_LEN)
