"""Jane Austen's six novels from the R package janeaustenr (Debian `r-cran-janeaustenr`), read from
its lazy-load database without R. Each novel is a character vector of hard-wrapped lines; it is
returned as a list of chapters, with prose paragraphs unwrapped onto one line."""

from __future__ import annotations

import re
from pathlib import Path

from slm_fast.data.rdata import RVector, load_lazyload_database
from slm_fast.errors import AssetError

# corpus title -> (janeaustenr variable, first line of its text), in order of publication.
AUSTEN_NOVELS: dict[str, tuple[str, str]] = {
    "sense_and_sensibility": ("sensesensibility", "SENSE AND SENSIBILITY"),
    "pride_and_prejudice": ("prideprejudice", "PRIDE AND PREJUDICE"),
    "mansfield_park": ("mansfieldpark", "MANSFIELD PARK"),
    "emma": ("emma", "EMMA"),
    "northanger_abbey": ("northangerabbey", "NORTHANGER ABBEY"),
    "persuasion": ("persuasion", "Persuasion"),
}
_HEADING = re.compile(r"(chapter|volume) ([ivxlc]+|\d+)", re.IGNORECASE)


def read_austen(folder: Path) -> dict[str, list[str]]:
    """Every novel as its list of chapters, keyed by title (see AUSTEN_NOVELS)."""
    variables = load_lazyload_database(folder / "Rdata")
    novels = {}
    for title, (variable, first_line) in AUSTEN_NOVELS.items():
        vector = variables.get(variable)
        if not isinstance(vector, RVector) or not vector.values or vector.values[0] != first_line:
            raise AssetError(f"{folder}/Rdata.rdb: variable {variable!r} is not the text of {first_line}")
        novels[title] = split_chapters(vector.values)
    return novels


def split_chapters(lines: list[str | None]) -> list[str]:
    """Group lines into paragraphs (separated by empty lines) and paragraphs into chapters, each
    starting at its "CHAPTER n" heading, or at the "VOLUME n" heading just before it. The front matter
    (title, author, preface) stays with the first chapter. Paragraphs are separated by a blank line."""
    chapters: list[list[str]] = [[]]
    has_chapter = False  # the current group holds a chapter heading
    after_heading = False
    for paragraph in _paragraphs(lines):
        heading = _HEADING.fullmatch(paragraph)
        if heading and has_chapter and not after_heading:
            chapters.append([])
            has_chapter = False
        if heading and heading[1].lower() == "chapter":
            has_chapter = True
        after_heading = heading is not None
        chapters[-1].append(paragraph)
    return ["\n\n".join(chapter) for chapter in chapters if chapter]


def _paragraphs(lines: list[str | None]) -> list[str]:
    """Runs of non-empty lines. Prose is unwrapped onto one line; indented runs (verse, letters,
    dividers) keep their line breaks."""
    paragraphs, run = [], []
    for line in [*lines, ""]:
        if line and line.strip():
            run.append(line)
        elif run:
            indented = any(r[0].isspace() for r in run)
            paragraphs.append(("\n" if indented else " ").join(r.strip() for r in run))
            run = []
    return paragraphs
