import pytest

from amzft.data.clean import FilterSettings, RecordFilter, clean_text
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
        ("Bless My Little Girl", "Book by", "junk_content"),
        ("Collins Bible Handbook", "Text: English, French (translation)", "junk_content"),
        ("Karl Barth", "Text: English (translation)Original Language: German", "junk_content"),
        ("Fine", "A real description of a fine product.", None),
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
