"""The stdlib docstring corpus: prose only, deduplicated, the same every time, and a
held-out split that does not move when the rest of the corpus changes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sparseserve.sparsify.corpus import chunks, sentences, stdlib_corpus

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
