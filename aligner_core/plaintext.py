"""User text stays text: special-token strings inside a question or an answer never become control tokens.

A tokenizer parses its special tokens (``<|im_end|>``, ``<|im_start|>``, ``</s>``, ...) wherever they
appear in the string it encodes, so an answer holding ``<|im_end|>\\n<|im_start|>assistant\\n...`` would
close the template's turn and open its own. When a question or an answer holds such a string, the
prompt is encoded piece by piece: the template's own text with its special tokens, the user's text
with ``split_special_tokens=True`` (as plain characters). Text without them is encoded exactly as
before, so the official templates' token ids do not change.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

Encode = Callable[..., list[int]]


_CACHE: weakref.WeakKeyDictionary[Any, tuple[int, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def encode_text(
    tokenizer: Any, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False
) -> list[int]:
    """Token ids of ``text``; ``split_special_tokens`` reads special-token strings as plain characters."""
    options = {"split_special_tokens": True} if split_special_tokens else {}
    return list(tokenizer(text, add_special_tokens=add_special_tokens, **options)["input_ids"])


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """The strings this tokenizer turns into special (control) tokens (cached per tokenizer and vocabulary size)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else -1
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", ()) or ()}
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    strings = tuple(sorted((s for s in found if s), key=len, reverse=True))
    with contextlib.suppress(TypeError):
        _CACHE[tokenizer] = (size, strings)
    return strings


def holds_special(tokenizer: Any, texts: Sequence[str]) -> bool:
    """Whether any of ``texts`` holds a string the tokenizer would read as a special token."""
    specials = special_strings(tokenizer)
    return any(s in t for t in texts for s in specials)


def encode_plain(
    encode: Encode, prompt: str, texts: Sequence[str], *, add_special_tokens: bool
) -> list[int] | None:
    """Tokens of ``prompt`` with each of ``texts`` (found verbatim in it, in order) encoded as plain text.

    ``encode(text, add_special_tokens=..., split_special_tokens=...)`` is the engine's encoder. Returns
    None when a text is not in the prompt verbatim (a template that rewrote it).
    """
    spans: list[tuple[int, int]] = []
    for text in texts:
        if not text:
            continue
        start = prompt.find(text)
        if start < 0:
            return None
        spans.append((start, start + len(text)))
    spans.sort()
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for start, end in spans:
        if start < pos:  # one text inside the other (a question repeated in the answer): keep the outer one
            continue
        pieces.append((prompt[pos:start], False))
        pieces.append((prompt[start:end], True))
        pos = end
    pieces.append((prompt[pos:], False))
    ids: list[int] = []
    first = True
    for text, plain in pieces:
        if not text:
            continue
        ids += encode(text, add_special_tokens=add_special_tokens and first, split_special_tokens=plain)
        first = False
    return ids
