"""The wording of messages (pipeline/base/text.py)."""

from pipeline.base.text import MAX_SHOWN, counted, shown


def test_a_count_takes_its_nouns_plural_unless_it_is_one():
    assert [counted(count, "face") for count in (0, 1, 4)] == ["0 faces", "1 face", "4 faces"]


def test_a_value_too_long_for_a_line_is_shown_cut_short():
    assert shown("abc") == "'abc'"
    assert len(shown("x" * 10**6)) <= MAX_SHOWN and len(shown(list(range(10**5)))) <= MAX_SHOWN
    # More digits than Python turns into text: said by its size.
    assert shown(10**5000) == f"an integer of {(10**5000).bit_length()} bits"
