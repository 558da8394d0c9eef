import random

import pytest

from amzft.data.clean import _BOILERPLATE, FilterSettings, RecordFilter, _strip_boilerplate, clean_text
from amzft.data.prompt import ALPACA_TEMPLATE, PromptFormat
from amzft.errors import ConfigError


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Judith Kerr&#8217;s best&#8211;selling", "Judith Kerr\u2019s best\u2013selling"),
        ("Fran&#xE7;ais &amp; more &quot;x&quot;", 'Fran\u00e7ais & more "x"'),
        ("a  b \t c ", "a b c"),
        ("Great book.--This text refers to thePaperbackedition.", "Great book."),
        ("Great.--This text refers to an alternateHardcoveredition.", "Great."),
        ("Review --Brian Bruya--This text refers to theHardcoveredition.", "Review --Brian Bruya"),
        ("Old.--This text refers to an out of print or unavailable edition of this title.", "Old."),
        ("X--This text refers to thePrint on Demand (Paperback)edition.", "X"),
        ("X --This text refers to the Library Binding edition. Y", "X Y"),
        # HTML markup, also entity-escaped; a "<" that is no tag stays
        ("Line one<br/>line two<p>three</p>", "Line one line two three"),
        ("<P CLASS='x'>Bold <b>mug</b></P><!-- note -->", "Bold mug"),
        ("&lt;br&gt;Mug&nbsp;&amp; cup", "Mug & cup"),
        ("Weighs <5 kg, fits a>b <3 <ipod>", "Weighs <5 kg, fits a>b <3 <ipod>"),
        # control characters: C0 and DEL are a separator like a space, tab and newline whitespace;
        # C1 are the Windows-1252 characters read as Latin-1 (undefined ones: a space)
        ("Mug\x00Blue\x07 \x1b[0m\x7fset\tof\n2", "Mug Blue [0m set of 2"),
        ("don\x92t \x93stop\x94\x85 1\x962\x81x", "don\u2019t \u201cstop\u201d\u2026 1\u20132 x"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_boilerplate_can_be_kept():
    raw = "Great.--This text refers to thePaperbackedition."
    assert clean_text(raw, strip_boilerplate=False) == raw


@pytest.mark.parametrize(
    "title, content, reason",
    [
        ("T", "", "empty_content"),
        ("T", "   ", "empty_content"),
        ("T", "--This text refers to thePaperbackedition.", "boilerplate_only"),
        ("", "Something real here", "empty_title"),
        ("Worship with Don Moen [VHS]", "Worship with Don Moen  [VHS]", "content_equals_title"),
        ("Toddler Tunes [VHS]", "VHS Tape", "junk_content"),
        ("Toddler Tunes [VHS]", "VHS Tape.......", "junk_content"),
        # casefold() turns one character into up to three: still the title
        ("\ufb03", "FFI", "content_equals_title"),
        ("Stra\u00dfe", "STRASSE", "content_equals_title"),
        ("Bless My Little Girl", "Book by", "junk_content"),
        ("Collins Bible Handbook", "Text: English, French (translation)", "junk_content"),
        ("Karl Barth", "Text: English (translation)Original Language: German", "junk_content"),
        ("Fine", "A real description of a fine product.", None),
        # a description of markup and entities only is empty, not a target
        ("T", "<p>&nbsp;</p>", "empty_content"),
        ("T", "<br/><br>", "empty_content"),
        ("T", "&#160;", "empty_content"),
        ("T", "&nbsp;<br/><p></p>", "empty_content"),
        ("T", "&lt;p&gt;&lt;/p&gt;", "empty_content"),
        ("T", "<p>--This text refers to thePaperbackedition.</p>", "boilerplate_only"),
        # a title of control characters (or markup) only is empty
        ("\x00\x07\x1b", "A real description.", "empty_title"),
        ("<b></b>", "A real description.", "empty_title"),
    ],
)
def test_filter_reasons(title, content, reason):
    assert RecordFilter(FilterSettings())(title, content)[2] == reason


def test_min_chars_and_dedupe_and_switches():
    f = RecordFilter(FilterSettings(min_content_chars=20))
    assert f("T", "short one")[2] == "too_short"
    assert f("T", "long enough description here")[2] is None
    assert f("T", "long  enough description here")[2] == "duplicate"  # same after cleaning
    assert f("T2", "long enough description here")[2] is None  # another product: kept
    lax = RecordFilter(FilterSettings(drop_title_only=False, drop_junk=False, dedupe=False))
    assert lax("VHS", "VHS")[2] is None
    assert lax("T", "VHS Tape")[2] is None
    assert lax("T", "VHS Tape")[2] is None
    kept = RecordFilter(FilterSettings(strip_boilerplate=False))
    assert kept("T", "<p>&nbsp;</p>")[2] == "empty_content"


def test_control_characters_never_reach_the_prompt_or_target():
    title, content, reason = RecordFilter(FilterSettings())("Mug\x00\x07Blue", "A\x01 mug\x81\x0b.")
    assert (title, content, reason) == ("Mug Blue", "A mug .", None)


def test_prompt_is_the_seed_alpaca_prompt_exactly():
    text = PromptFormat().render("Girls Ballet Tutu {Neon} Pink")
    assert text == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is the description of product Girls Ballet Tutu {Neon} Pink?\n\n"
        "### Input:\n\n\n### Response:\n"
    )


def test_prompt_is_configurable_and_checked():
    fmt = PromptFormat(question="Describe {title}.", template="Q: {instruction} {input}\nA: ", input_text="ctx")
    assert fmt.render("Mug") == "Q: Describe Mug. ctx\nA: "
    with pytest.raises(ConfigError, match=r"\{title\}"):
        PromptFormat(question="no placeholder")
    with pytest.raises(ConfigError, match=r"\{input\}"):
        PromptFormat(template=ALPACA_TEMPLATE.replace("{input}", ""))


def test_the_boilerplate_shortcut_removes_exactly_what_the_regex_does():
    """clean._strip_boilerplate runs _BOILERPLATE from the first note's preceding spaces and
    dashes only (speed): on texts mixing the note's pieces, cases, dashes, Unicode spaces and
    the long s that IGNORECASE matches to "s", it must give the regex's own result."""
    pieces = ["This text refers to", "this TEXT refers to", "thi\u017f text refers to", " ", "-", "--", "\u00a0", "\n",
              "edition", " edition of this title.", "an ", "the ", "Paperback", "x", ".", "prefers to", "efers to"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(20000)]
    texts.append("A fine book. --This text refers to thePaperbackedition.")
    assert [_strip_boilerplate(t) for t in texts] == [_BOILERPLATE.sub(" ", t) for t in texts]


def test_whitespace_is_collapsed_as_split_and_join_would():
    """clean_text returns a text with nothing to collapse as it is (speed): the same as
    " ".join(text.split()) for every kind of whitespace Python splits on."""
    pieces = ["a", "b", " ", "  ", "\t", "\n", "\u00a0", "\u2009", "\u3000", "\u2028", "caf\u00e9", "-"]
    rng = random.Random(1)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(20000)]
    assert [clean_text(t, strip_boilerplate=False) for t in texts] == [" ".join(t.split()) for t in texts]
