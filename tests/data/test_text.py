"""Text corpora: parsing on small files written here, plus the real files when installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kdistill.data import text
from kdistill.data.fashion_mnist import DatasetNotFoundError
from kdistill.data.text import (
    WORDNET_CATEGORIES,
    TextClassificationData,
    find_fortunes,
    find_wordnet,
    load_fortunes,
    load_kjv,
    load_pydoc_topics,
    load_wordnet_glosses,
    parse_fortune_file,
    parse_wordnet_data_file,
)

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def _synset(offset: int, category: int, pos: str, word: str, gloss: str) -> str:
    return f"{offset:08d} {category:02d} {pos} 01 {word} 0 000 | {gloss}  \n"


@pytest.fixture
def wordnet_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dict"
    folder.mkdir()
    files = {
        "noun": [
            _synset(1740, 3, "n", "entity", "that which is perceived"),
            _synset(1930, 5, "n", "dog", 'a domestic canine; "the dog barked all night"'),
        ],
        "verb": [_synset(2000, 38, "v", "run", "move fast by using one's feet")],
        "adj": [
            _synset(3000, 0, "a", "able", "(usually followed by `to') having the means"),
            _synset(3001, 44, "s", "caf\xe9", "served in a caf\xe9"),  # latin-1 byte
        ],
        "adv": [_synset(4000, 2, "r", "very", 'to a high degree; "very hot"; "very cold"')],
    }
    for pos, lines in files.items():
        with open(folder / f"data.{pos}", "w", encoding="latin-1") as f:
            f.write(LICENCE + LICENCE + "".join(lines))
    return folder


def test_wordnet_category_table_is_the_45_lexicographer_files():
    assert len(WORDNET_CATEGORIES) == 45
    assert WORDNET_CATEGORIES[3] == "noun.Tops"
    assert WORDNET_CATEGORIES[5] == "noun.animal"
    assert WORDNET_CATEGORIES[38] == "verb.motion"
    assert WORDNET_CATEGORIES[44] == "adj.ppl"
    assert len(set(WORDNET_CATEGORIES)) == 45


def test_wordnet_glosses_are_parsed_with_their_categories(wordnet_dir):
    data = load_wordnet_glosses(root=wordnet_dir)
    assert data.texts == [
        "that which is perceived",
        'a domestic canine; "the dog barked all night"',
        "move fast by using one's feet",
        "(usually followed by `to') having the means",
        "served in a café",
        'to a high degree; "very hot"; "very cold"',
    ]
    assert data.labels.tolist() == [3, 5, 38, 0, 44, 2]
    assert [data.classes[i] for i in data.labels[:3]] == ["noun.Tops", "noun.animal", "verb.motion"]
    assert data.source == wordnet_dir


def test_wordnet_strip_examples_and_pos_subset(wordnet_dir):
    data = load_wordnet_glosses(root=wordnet_dir, pos=["noun", "adv"], strip_examples=True)
    assert data.texts == ["that which is perceived", "a domestic canine", "to a high degree"]
    with pytest.raises(ValueError, match=r"subset of \('noun', 'verb', 'adj', 'adv'\).*'nouns'"):
        load_wordnet_glosses(root=wordnet_dir, pos=["nouns"])


def test_malformed_wordnet_line_names_file_and_line(tmp_path):
    bad = tmp_path / "data.noun"
    bad.write_text(LICENCE + "00001740 03 n 01 entity 0 000 no gloss separator\n")
    with pytest.raises(ValueError, match=r"data\.noun:2 is not a WordNet synset line"):
        parse_wordnet_data_file(bad)
    bad.write_text(_synset(1, 45, "n", "x", "y"))
    with pytest.raises(ValueError, match=r"lex_filenum 45.*45 categories"):
        parse_wordnet_data_file(bad)


def test_wordnet_lookup_order_and_not_found_message(wordnet_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "WORDNET_DIRS", (tmp_path / "nowhere",))
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    with pytest.raises(
        DatasetNotFoundError, match=r"(?s)WordNet not found.*nowhere.*apt-get install wordnet-base"
    ):
        find_wordnet()
    monkeypatch.setenv("WNSEARCHDIR", str(wordnet_dir))
    assert find_wordnet() == wordnet_dir
    data_root = tmp_path / "data"
    shutil.copytree(wordnet_dir, data_root / "wordnet")
    monkeypatch.setenv("KDISTILL_DATA", str(data_root))
    assert find_wordnet() == data_root / "wordnet"  # $KDISTILL_DATA before $WNSEARCHDIR
    assert find_wordnet(root=wordnet_dir) == wordnet_dir  # the argument first


@pytest.fixture
def fortune_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "science").write_text("E = mc^2\n\t\t-- Einstein\n%\n%\nA B\x08B C\n%\n")
    (folder / "love").write_text(
        "This is the ___\x08LAST time.\n%\n_\x08u_\x08n_\x08d_\x08e_\x08r\n"
    )
    (folder / "love.dat").write_bytes(b"\x00\x00\x00\x02")  # index file: skipped
    (folder / "love.u8").write_text("ignored\n%\n")
    (folder / "off").mkdir()  # sub-folder (offensive fortunes): skipped
    return folder


def test_fortune_entries_split_on_percent_lines_without_overstrike(fortune_dir):
    assert parse_fortune_file(fortune_dir / "science") == ["E = mc^2\n\t\t-- Einstein", "A B C"]
    assert parse_fortune_file(fortune_dir / "love") == ["This is the LAST time.", "under"]


def test_fortunes_are_labelled_by_category_file(fortune_dir, monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    data = load_fortunes(root=fortune_dir)
    assert data.classes == ("love", "science")
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.texts[2] == "E = mc^2\n\t\t-- Einstein"


def test_fortunes_not_found_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "FORTUNE_DIRS", (tmp_path / "none",))
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install fortunes"):
        find_fortunes()


def test_stratified_split_is_disjoint_keeps_class_shares_and_is_seeded():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    data = TextClassificationData([f"t{i}" for i in range(100)], labels, ("a", "b", "c"))
    train, test = data.split([0.8, 0.2], seed=1)
    assert len(train) + len(test) == 100
    assert not set(train.texts) & set(test.texts)
    assert np.bincount(test.labels).tolist() == [10, 6, 4]
    for part in (train, test):  # texts and labels stay paired
        assert all(
            int(t[1:]) in np.flatnonzero(labels == y)
            for t, y in zip(part.texts, part.labels, strict=True)
        )
    assert data.split([0.8, 0.2], seed=1)[1].texts == test.texts
    assert data.split([0.8, 0.2], seed=2)[1].texts != test.texts
    (small,) = data.split([0.1])
    assert np.bincount(small.labels).tolist() == [5, 3, 2]
    with pytest.raises(ValueError, match="sum to at most 1"):
        data.split([0.8, 0.3])


def test_kjv_from_a_text_file_gives_paragraphs(tmp_path):
    file = tmp_path / "kjv.txt"
    file.write_text("In the beginning God created\nthe heaven and the earth.\n\n\nAnd God said.\n")
    assert load_kjv(file) == [
        "In the beginning God created the heaven and the earth.",
        "And God said.",
    ]
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_kjv(tmp_path / "missing.txt")


def test_kjv_not_found_says_how_to_install(monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.setattr(text.shutil, "which", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install bible-kjv"):
        load_kjv()


def test_pydoc_topics_are_long_english_documents():
    docs = load_pydoc_topics()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 300_000
    assert all(docs)


# -- the real corpora, when installed ------------------------------------------------------


def _installed(find) -> bool:
    try:
        find()
    except DatasetNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(find_wordnet), reason="WordNet (wordnet-base) not installed")
def test_real_wordnet_has_117659_glosses_in_45_categories():
    data = load_wordnet_glosses()
    assert len(data) == 117_659
    assert len(np.unique(data.labels)) == 45
    assert data.texts[0].startswith("that which is perceived or known or inferred")
    assert data.classes[data.labels[0]] == "noun.Tops"


@pytest.mark.skipif(not _installed(find_fortunes), reason="fortunes not installed")
def test_real_fortunes_have_43_categories():
    data = load_fortunes()
    assert len(data.classes) == 43
    assert len(data) > 15_000
    assert not any("\x08" in t for t in data.texts)


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv not installed")
def test_real_kjv_has_31102_verses_in_order(monkeypatch):
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    verses = load_kjv()
    assert len(verses) == 31_102
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."
