"""The text corpora: prose only, deduplicated, the same every time, and a
held-out split that does not move when the rest of the corpus changes."""

from __future__ import annotations

import gzip
import textwrap
from pathlib import Path

import pytest

from sparseserve.sparsify.corpus import (
    MixedCorpus,
    chunks,
    english_corpus,
    fortune_sentences,
    length_sorted,
    man_page_sentences,
    package_doc_sentences,
    sentences,
    stdlib_corpus,
)

MODULE = '''
"""Tools for reading the local weather. The forecast comes from the barometer in the hall.

>>> read("hall")
1013
"""


class Barometer:
    """A barometer hangs on the wall and measures the air pressure.

    Usage::

        Barometer().read() -> float
    """

    def read(self):
        """Return the pressure in hectopascals, rounded to whole numbers."""


def helper():
    """x == y"""
'''

# The same class docstring again, in another file: it must appear once.
OTHER = '''
"""Tools kept in the garden shed. A barometer hangs on the wall and measures the air pressure."""
'''


def write_tree(root: Path) -> Path:
    (root / "weather.py").write_text(textwrap.dedent(MODULE))
    (root / "shed.py").write_text(OTHER)
    (root / "test").mkdir()
    (root / "test" / "test_weather.py").write_text('"""Tests are not prose we want here at all."""')
    (root / "broken.py").write_text("def (:\n")  # a file that does not parse is skipped
    return root


def test_sentences_are_prose_from_docstrings_deduplicated_in_path_order(tmp_path: Path) -> None:
    found = sentences(write_tree(tmp_path))
    assert found == [
        # shed.py sorts before weather.py
        "Tools kept in the garden shed.",
        "A barometer hangs on the wall and measures the air pressure.",
        "Tools for reading the local weather.",
        "The forecast comes from the barometer in the hall.",
        "Return the pressure in hectopascals, rounded to whole numbers.",
    ]
    assert sentences(tmp_path) == found


def test_chunks_join_sentences_up_to_a_word_budget() -> None:
    text = ["one two three.", "four five.", "six seven eight nine ten eleven.", "twelve."]
    assert chunks(text, max_words=5) == [
        "one two three. four five.",
        "six seven eight nine ten eleven.",  # too long alone: a chunk of its own
        "twelve.",
    ]


def test_heldout_membership_depends_only_on_the_text(tmp_path: Path) -> None:
    write_tree(tmp_path)
    small = stdlib_corpus(max_words=1, heldout_fraction=0.5, root=tmp_path)
    (tmp_path / "more.py").write_text('"""Another module about rain and snow in the hills."""')
    large = stdlib_corpus(max_words=1, heldout_fraction=0.5, root=tmp_path)
    assert set(small.heldout) <= set(large.heldout)
    assert set(small.train) <= set(large.train)
    assert not set(large.train) & set(large.heldout)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 1\)"):
        stdlib_corpus(heldout_fraction=1.0, root=tmp_path)
    with pytest.raises(ValueError, match="no docstring prose found"):
        stdlib_corpus(root=tmp_path)


@pytest.mark.slow
def test_the_standard_library_gives_a_usable_english_corpus() -> None:
    corpus = stdlib_corpus()
    total = len(corpus.train) + len(corpus.heldout)
    assert total > 1000
    assert 0.05 < len(corpus.heldout) / total < 0.15
    assert not set(corpus.train) & set(corpus.heldout)
    assert len(set(corpus.train)) == len(corpus.train)
    assert corpus.source.startswith("Python 3.")
    assert all(">>>" not in chunk for chunk in corpus.train)
    assert all(len(chunk.split()) >= 6 for chunk in corpus.heldout)


# english-mix: man pages, package docs and fortunes beside the docstrings

MAN_PAGE = r""".\" Copyright notice: not text.
.TH WEATHER 1 "2026" "weather 1.0"
.SH NAME
weather \- read the barometer
.SH SYNOPSIS
\fBweather\fR [\fB\-v\fR] \fIstation\fR
.SH DESCRIPTION
The \fBweather\fR program reads the barometer in the hall and prints the pressure.
It keeps a diary of every reading in your home directory\(em one line a day.
.PP
.B Weather
never changes the barometer, it only looks at it carefully.
.TP
\fB\-v\fR
Print more.
"""

FORTUNES = """A banker is a fellow who lends you his umbrella when the sun is shining.
\t\t-- Mark Twain
%
The best way to predict the future is to invent it, said the engineer.
%
Short one.
%
"""


def write_sources(root: Path) -> dict[str, Path]:
    (root / "stdlib").mkdir()
    stdlib = write_tree(root / "stdlib")
    man1 = root / "man" / "man7"
    man1.mkdir(parents=True)
    (man1 / "weather.7.gz").write_bytes(gzip.compress(MAN_PAGE.encode()))
    (man1 / "barometer.7.gz").write_bytes(gzip.compress(b".so man7/weather.7\n"))
    fortunes = root / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text(FORTUNES)
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (fortunes / "ascii-art").write_text("Pictures are not prose, even when long enough.\n%\n")
    # The same sentence as a docstring of the stdlib tree: it belongs to the first source.
    (fortunes / "people").write_text(
        "A barometer hangs on the wall and measures the air pressure.\n%\n"
        "People who live in glass houses should not throw stones at all.\n%\n"
    )
    packages = root / "site-packages" / "rainfall-1.0.dist-info"
    packages.mkdir(parents=True)
    (packages / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rainfall\n\n# Rainfall\n\n"
        "Rainfall measures how much rain fell in your [garden](https://example.org) today.\n\n"
        "```python\nimport rainfall; rainfall.measure('garden') is not prose at all\n```\n"
    )
    return {"stdlib": stdlib, "man": root / "man", "fortunes": fortunes,
            "packages": root / "site-packages"}  # fmt: skip


def test_man_pages_give_their_running_text_without_markup(tmp_path: Path) -> None:
    roots = write_sources(tmp_path)
    assert man_page_sentences(roots["man"]) == [
        "The weather program reads the barometer in the hall and prints the pressure.",
        "It keeps a diary of every reading in your home directory - one line a day.",
        "Weather never changes the barometer, it only looks at it carefully.",
    ]


def test_fortunes_and_package_docs_give_sentences_without_attributions_or_code(
    tmp_path: Path,
) -> None:
    roots = write_sources(tmp_path)
    found = fortune_sentences(roots["fortunes"])
    assert list(found) == ["people", "wisdom"]  # no index files, no ascii-art
    assert found["wisdom"] == [
        "A banker is a fellow who lends you his umbrella when the sun is shining.",
        "The best way to predict the future is to invent it, said the engineer.",
    ]
    assert package_doc_sentences(roots["packages"]) == [
        "Rainfall measures how much rain fell in your garden today."
    ]


def test_english_corpus_tags_each_chunk_and_keeps_the_heldout_source_apart(
    tmp_path: Path,
) -> None:
    roots = write_sources(tmp_path)

    def build(heldout_source: str | None) -> MixedCorpus:
        return english_corpus(
            max_words=1, heldout_fraction=0.3, heldout_source=heldout_source,
            stdlib_root=roots["stdlib"], man_root=roots["man"],
            packages_root=roots["packages"], fortunes_root=roots["fortunes"],
        )  # fmt: skip

    corpus = build("fortunes-wisdom")
    assert corpus == build("fortunes-wisdom")  # deterministic
    assert set(corpus.chunks_per_source) == {
        "stdlib-docstrings", "man-pages", "package-docs", "fortunes-people", "fortunes-wisdom"
    }  # fmt: skip
    assert {c.source for c in corpus.heldout_source} == {"fortunes-wisdom"}
    assert len(corpus.heldout_source) == 2
    trained = {c.source for c in corpus.train + corpus.heldout}
    assert "fortunes-wisdom" not in trained
    texts = [c.text for c in corpus.train + corpus.heldout + corpus.heldout_source]
    assert len(texts) == len(set(texts))  # deduplicated across sources
    barometer = "A barometer hangs on the wall and measures the air pressure."
    assert [c.source for c in corpus.train + corpus.heldout if c.text == barometer] == [
        "stdlib-docstrings"
    ]
    # A family of sources: every fortune file apart.
    assert {c.source for c in build("fortunes").heldout_source} == {
        "fortunes-people", "fortunes-wisdom"
    }  # fmt: skip
    # The split of the trained sources does not depend on which source is held out.
    assert set(build(None).heldout) >= set(corpus.heldout)
    with pytest.raises(ValueError, match="'poetry' is not among this machine's sources"):
        build("poetry")


def test_length_sorting_keeps_windows_and_their_members() -> None:
    texts = ["ccc", "a", "bb", "dddd", "e", "ff"]
    assert length_sorted(texts, 1) == texts
    assert length_sorted(texts, 3) == ["a", "bb", "ccc", "e", "ff", "dddd"]


@pytest.mark.slow
def test_this_machine_gives_a_broad_english_corpus() -> None:
    corpus = english_corpus(max_words=32, heldout_source="fortunes-literature")
    sources = corpus.chunks_per_source
    assert sources["stdlib-docstrings"] > 1000
    if not (Path("/usr/share/games/fortunes/literature")).exists():
        pytest.skip("Debian's fortunes are not installed (make corpus-text)")
    assert len(corpus.heldout_source) > 100
    assert sum(count for name, count in sources.items() if name.startswith("fortunes-")) > 5000
