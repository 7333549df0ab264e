import re

import pytest

from bft_assets.prompts import BACKTRANSLATE, REWRITE, SCORE, Prompt, llama2_inst

from conftest import REPO

# The method as the documentation site gives it: its first three plain ``` blocks are the
# paper's prompts (backtranslation, scoring, rewriting).
METHOD = REPO / "docs" / "method.md"


@pytest.fixture(scope="module")
def method_blocks() -> list[str]:
    return [b.removesuffix("\n") for b in re.findall(r"```\n(.*?)```", METHOD.read_text(), re.S)]


def test_prompts_match_method_byte_for_byte(method_blocks):
    backtranslate, score, rewrite = method_blocks[:3]
    assert llama2_inst(BACKTRANSLATE.template) == backtranslate
    assert SCORE.template == score
    assert llama2_inst(REWRITE.template) == rewrite


def test_render_fills_each_placeholder_once_without_rescanning():
    # A web page that contains another placeholder's name must come through verbatim.
    rendered = REWRITE.render(response="see <instruction> below", instruction="Why?")
    assert "Draft Response: see <instruction> below\n" in rendered
    assert "Question: Why?\n" in rendered


def test_render_rejects_missing_or_unknown_placeholders():
    with pytest.raises(ValueError, match="takes"):
        SCORE.render(generated_instruction="x")
    with pytest.raises(ValueError, match="takes"):
        BACKTRANSLATE.render(response="x", extra="y")


def test_version_follows_the_text():
    edited = Prompt("backtranslate", BACKTRANSLATE.template + " ")
    assert edited.version != BACKTRANSLATE.version
    assert Prompt("backtranslate", BACKTRANSLATE.template).version == BACKTRANSLATE.version
