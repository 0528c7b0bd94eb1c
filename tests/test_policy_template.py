"""Session templates: $NAME and ${NAME} are filled, $$ and $$SCONE::...$$ are left alone."""

from __future__ import annotations

import pytest

from tdapp.errors import UsageError
from tdapp.policy import fill_template, template_variables


def test_both_spellings_are_filled() -> None:
    text = "name: $SESSION\nsuffix: ${SESSION}_x\npath: /$A/${B}\n"
    filled = fill_template(text, {"SESSION": "s1", "A": "a", "B": "b"})
    assert filled == "name: s1\nsuffix: s1_x\npath: /a/b\n"


def test_session_language_placeholders_pass_through() -> None:
    text = ("content: $$SCONE::SERVER_CERT.crt$$\nlog: $$SCONE::otp:base32nopad$$\n"
            "cost: 5$ and $$ and $1\n")
    assert fill_template(text, {}) == text
    assert template_variables(text) == set()


def test_variables_are_listed() -> None:
    text = "a: $ONE ${TWO} $$SCONE::THREE$$ $ONE $_four5\n"
    assert template_variables(text) == {"ONE", "TWO", "_four5"}


def test_unfilled_variable_is_named() -> None:
    with pytest.raises(UsageError) as caught:
        fill_template("key: $INPUT_FSPF_KEY\n", {"OTHER": "x"})
    assert str(caught.value) == ("template variable $INPUT_FSPF_KEY is not set "
                                 "(give -e INPUT_FSPF_KEY=VALUE)")


def test_all_unfilled_variables_are_reported_first_one_in_full() -> None:
    with pytest.raises(UsageError) as caught:
        fill_template("a: $A\nb: ${B}\nc: $C\na2: $A\n", {"B": "b"})
    assert str(caught.value) == ("template variable $A is not set (give -e A=VALUE); "
                                 "also not set: $C")


def test_malformed_braces_are_refused() -> None:
    with pytest.raises(UsageError, match="malformed template variable at line 2"):
        fill_template("a: 1\nb: ${NAME-default}\n", {"NAME": "x"})


def test_values_cannot_add_lines() -> None:
    with pytest.raises(UsageError, match=r"\$SESSION contains a line break"):
        fill_template("name: $SESSION\n", {"SESSION": "x\nservices: []"})


def test_values_are_inserted_verbatim() -> None:
    assert fill_template("v: $V", {"V": "$$SCONE::x$$ $OTHER"}) == "v: $$SCONE::x$$ $OTHER"
