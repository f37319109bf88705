"""qlora/errors.py: an exception in one line, whatever its message looks like."""
from __future__ import annotations

from qlora.errors import brief, first_line, message


def test_an_exception_reads_as_its_first_non_blank_line_cut_short_or_as_its_type():
    class ArrowInvalid(Exception):
        pass

    assert first_line(ArrowInvalid("")) == "" and brief(ArrowInvalid("")) == "ArrowInvalid"  # no IndexError
    assert brief(ValueError("\n  expected a mapping\n  in line 3")) == "ValueError: expected a mapping"
    assert first_line(OSError("x" * 500)) == "x" * 200 and len(first_line(OSError("y" * 500), 300)) == 300
    assert brief(KeyError("model.layers.0")) == "KeyError: 'model.layers.0'"
    assert message(ArrowInvalid("")) == "ArrowInvalid" and message(ValueError("\n bad row 3\n more")) == "bad row 3"
