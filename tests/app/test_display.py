"""What the app shows of a visitor's text is inert: no Markdown, HTML or link of any kind survives md()."""

from __future__ import annotations

import re

import pytest

from pages.shell.display import WORD_JOINER, md

LINKS = ["www.hf-login.example.org/verify", "https://evil.example/x?y=1", "http://a.b", "me@example.org",
         "Your session expired: sign in again at www.hf-login.example.org/verify", "ftp://x.y", "[a](b)", "<https://x>"]


@pytest.mark.parametrize("text", LINKS)
def test_no_autolink_or_markup_survives(text):
    shown = md(text)
    assert not re.search(r"(?<!\\)[:<>\[\]]", shown), shown  # Markdown's own link and HTML syntax: escaped
    rendered = shown.replace("\\", "")  # an escaped character renders as itself
    assert not re.search(r"(?i)www\.|\w://|\w@", rendered), rendered  # where GFM autolinks start: broken
    assert rendered.replace(WORD_JOINER, "") == text  # and nothing visible changed


def test_plain_words_pass_unchanged():
    assert md("Hello world 42") == "Hello world 42"
