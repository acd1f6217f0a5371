"""Calibration sources (every kind --calib accepts) and packing (slm_fast.data.pack_calibration).
The `datasets` sources are built in temporary folders: a save_to_disk folder, and a dataset cached the
way `load_dataset` caches it, then read back with HF_DATASETS_OFFLINE=1 (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from slm_fast.data import load_corpus, pack_calibration
from slm_fast.data.hf_datasets import parse_dataset_spec
from slm_fast.data.shipped import read_shipped
from slm_fast.errors import InputError

WORDS = [f"w{i}" for i in range(300)]
BOS, EOS = 1, 2


def tokenizer(add_bos: bool = False, eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level: w{i} has id i + 3; <s> = 1, </s> = 2."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>" if eos else None, unk_token="<unk>"
    )


def documents(lengths: list[int]) -> list[str]:
    """Document d is the words w(50 d) .. w(50 d + n - 1): ids tell which document a token came from."""
    return [" ".join(WORDS[50 * d + k] for k in range(n)) for d, n in enumerate(lengths)]


def expected_stream(lengths: list[int], seed: int) -> list[int]:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for position, d in enumerate(order):
        stream += ([EOS] if position else []) + [50 * d + k + 3 for k in range(lengths[d])]
    return stream


# --- packing -------------------------------------------------------------------------------------


def test_packing_joins_shuffled_documents_with_eos_and_cuts_exact_lengths() -> None:
    lengths = [5, 12, 3, 20]  # 40 words + 3 separators = 43 tokens
    packed = pack_calibration(tokenizer(), documents(lengths), n_samples=4, seq_len=10, seed=7)
    assert packed.dtype == torch.long and packed.shape == (4, 10)
    assert packed.flatten().tolist() == expected_stream(lengths, 7)[:40]
    assert (packed == EOS).sum() >= 2  # document boundaries fall inside the samples
    assert BOS not in packed.flatten().tolist()


def test_packing_starts_every_sample_with_bos_when_the_tokenizer_adds_one() -> None:
    lengths = [30, 30]
    packed = pack_calibration(tokenizer(add_bos=True), documents(lengths), n_samples=3, seq_len=8, seed=0)
    assert packed[:, 0].tolist() == [BOS] * 3
    assert packed[:, 1:].flatten().tolist() == expected_stream(lengths, 0)[:21]


def test_packing_is_seeded() -> None:
    corpus = documents([10] * 3)
    first = pack_calibration(tokenizer(), corpus, n_samples=2, seq_len=8, seed=1)
    assert torch.equal(first, pack_calibration(tokenizer(), corpus, n_samples=2, seq_len=8, seed=1))
    orders = {tuple(pack_calibration(tokenizer(), corpus, 2, 8, seed=s)[0].tolist()) for s in range(6)}
    assert len(orders) > 1


def test_packing_without_eos_separates_documents_by_a_blank_line() -> None:
    tok = tokenizer(eos=False)
    packed = pack_calibration(tok, documents([4, 4]), n_samples=1, seq_len=8, seed=0)
    separator = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(packed[0]) == 8 and EOS not in packed[0].tolist()
    assert separator == [] or set(separator) & set(packed[0].tolist())


def test_packing_a_too_small_corpus_states_what_it_has_and_needs() -> None:
    with pytest.raises(InputError, match=r"has 23 tokens \(2 documents.*10 samples x 8 tokens need 80"):
        pack_calibration(tokenizer(), documents([10, 12]), n_samples=10, seq_len=8)
    with pytest.raises(InputError, match=r"has 0 tokens"):
        pack_calibration(tokenizer(), [], n_samples=1, seq_len=8)
    with pytest.raises(InputError, match="seq_len >= 2"):
        pack_calibration(tokenizer(), documents([10]), n_samples=1, seq_len=1)


def test_short_paragraphs_pack_where_the_reference_sampler_cannot(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(" ".join(WORDS[:6]) for _ in range(40)) + "\n")
    packed = pack_calibration(tokenizer(), load_corpus(str(path)), n_samples=5, seq_len=32)
    assert packed.shape == (5, 32)


# --- sources -------------------------------------------------------------------------------------


def test_default_calibration_text_is_shipped_in_the_package() -> None:
    emma = load_corpus("austen:emma")
    assert emma == read_shipped("emma")
    assert len(emma) == 55 and emma[0].startswith("EMMA\n\nBy Jane Austen")
    assert sum(len(chapter.split()) for chapter in emma) > 150_000


def test_txt_jsonl_and_parquet_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one two\n\nthree\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y"}) + "\n" + json.dumps({"body": "z"}) + "\n")
    pq.write_table(pa.table({"body": ["p", None, "q"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert load_corpus(str(tmp_path / "a.txt")) == ["one two", "three"]
    assert load_corpus(str(tmp_path / "b.jsonl"), field="body") == ["x y", "z"]
    assert load_corpus(str(tmp_path / "c.parquet"), field="body") == ["p", "q"]


def test_missing_field_names_the_file_and_the_fields(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    pq.write_table(pa.table({"body": ["p"], "n": [1]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"b.jsonl:1: no string field 'text' \(it has 'body'\).*--calib-field"):
        load_corpus(str(tmp_path / "b.jsonl"))
    with pytest.raises(InputError, match=r"c.parquet has no field 'text' \(fields: body, n\)"):
        load_corpus(str(tmp_path / "c.parquet"))
    with pytest.raises(InputError, match=r"c.parquet: field 'n' holds int64, not text"):
        load_corpus(str(tmp_path / "c.parquet"), field="n")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "blank.txt"])
def test_empty_files_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("\n \n" if name == "blank.txt" else "")
    with pytest.raises(InputError, match=rf"corpus file .*{name} holds no text \(it is empty\)"):
        load_corpus(str(tmp_path / name))


def test_missing_files_and_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.parquet does not exist"):
        load_corpus(str(tmp_path / "missing.parquet"))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown corpus file type"):
        load_corpus(str(tmp_path / "notes.csv"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not one written by datasets' save_to_disk"):
        load_corpus(str(tmp_path / "folder"))


def test_save_to_disk_folders(tmp_path: Path) -> None:
    import datasets

    one = datasets.Dataset.from_dict({"text": ["a b", "c"], "id": [1, 2]})
    one.save_to_disk(str(tmp_path / "one"))
    assert load_corpus(str(tmp_path / "one")) == ["a b", "c"]
    both = datasets.DatasetDict({"train": one, "validation": one.select([1])})
    both.save_to_disk(str(tmp_path / "both"))
    assert load_corpus(str(tmp_path / "both")) == ["a b", "c"]
    with pytest.raises(InputError, match="has no field 'body'"):
        load_corpus(str(tmp_path / "one"), field="body")


def test_dataset_spec_parsing() -> None:
    assert parse_dataset_spec("org/name") == ("org/name", None, "train")
    assert parse_dataset_spec("wikitext:wikitext-2-raw-v1:validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    assert parse_dataset_spec("org/name::test") == ("org/name", None, "test")
    with pytest.raises(InputError, match="NAME\\[:CONFIG\\]\\[:SPLIT\\]"):
        parse_dataset_spec("a:b:c:d")


@pytest.fixture
def offline_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A datasets cache holding `tinytext` (train and test splits) as load_dataset caches a dataset."""
    import datasets

    source = tmp_path / "src" / "tinytext"
    source.mkdir(parents=True)
    (source / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    (source / "test.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    cache = tmp_path / "hf_datasets"
    datasets.load_dataset(str(source), cache_dir=str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_dataset_spec_from_the_offline_cache(offline_datasets_cache: Path) -> None:
    assert load_corpus("tinytext") == ["doc 0", "doc 1", "doc 2"]
    assert load_corpus("tinytext:default:test") == ["held out"]
    with pytest.raises(InputError, match=r"tinytext::validation has no split 'validation' \(splits: train, test\)"):
        load_corpus("tinytext::validation")


def test_a_dataset_not_in_the_cache_is_named(offline_datasets_cache: Path) -> None:
    with pytest.raises(
        InputError, match=r"dataset 'someorg/absent:en' could not be loaded from the local datasets cache"
    ):
        load_corpus("someorg/absent:en")
