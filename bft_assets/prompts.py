"""The method's prompts, byte for byte as docs/method.md gives them (Nguyen et al. 2024, Li et al. 2023).

Each prompt is the *message* a user sends; the paper's ``[INST] ... [/INST]`` markers are
Llama-2's chat template around that message, so a model with a chat template gets the same
message rendered by its own template, and a model without one (a base model) gets the
Llama-2 markers (``llama2_inst``). Every prompt carries a version derived from its text, so
that editing a prompt changes the code version of every asset that sends it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from bft_resources.engine.rendering import strip_special

SEED_TAG = "Answer in the style of an AI Assistant."
WEB_TAG = "Answer with knowledge from web search."
# Evaluation (docs/method.md step 5): the two suffixes the paper tries, worded exactly; it keeps
# the one with the higher win rate on average over the compared models (one choice for all).
EVAL_TAGS = {
    "assistant": SEED_TAG,
    "web_if_needed": "Answer in the style of an AI Assistant, with knowledge from web search if needed.",
}

# Markers the method's prompts and parsers rely on; web text must not carry them in.
_MARKERS = re.compile(r"\[(/?)(INST|RES)\]", re.IGNORECASE)

_PLACEHOLDER = re.compile(
    r"<(response|generated instruction|output|instruction|first answer|second answer)>"
)
# How a reply states a score: "Score: 5", "score:5/5", "**Score:** 4", "Score - 4",
# "Rating: 3", "final score = 5": a label and its separator before the value. The one
# pattern the score parser reads (bft_assets.replies) and ``neutralize`` disarms in every
# text it puts in a prompt.
VERDICT = re.compile(r"(score|rating)\s*\**\s*[:=\-]?\s*\**\s*(?=-?\d)", re.I)


@dataclass(frozen=True)
class Prompt:
    name: str
    template: str

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(_PLACEHOLDER.findall(self.template))

    @property
    def version(self) -> str:
        return f"{self.name}-{hashlib.sha256(self.template.encode()).hexdigest()[:10]}"

    def render(self, **values: str) -> str:
        """Fill the placeholders in one pass over the template, so text inserted for one
        placeholder is never scanned for another (a web page may contain '<instruction>')."""
        given = {k.replace("_", " "): v for k, v in values.items()}
        if set(given) != self.placeholders:
            raise ValueError(f"{self.name} takes {sorted(self.placeholders)}, got {sorted(given)}")
        return _PLACEHOLDER.sub(lambda m: given[m.group(1)], self.template)


def neutralize(text: str, special_tokens: list[str] | tuple[str, ...] = ()) -> str:
    """Text from the web or from a model, made safe to put inside a prompt: the chat markers
    ``[INST]``/``[RES]`` become ``(INST)``/``(RES)``, every verdict shape the score parser reads
    (``Score: 5``, ``My Rating: 5``, ``final score = 5``) becomes ``Score of 5`` (so an echo
    cannot pass for a verdict), and the tokenizer's special tokens (e.g. ``<|im_start|>``)
    are removed until none is left, since a tokenizer would read them as control tokens."""
    text = _MARKERS.sub(
        lambda m: f"({m.group(1)}{m.group(2)})", strip_special(text, special_tokens)
    )
    return VERDICT.sub(lambda m: f"{m.group(1)} of ", text)


# A line that is nothing but a rating ("Score: 5", "**Rating** - 5/5", "Score of 4"): in a
# document under review it is the document grading itself.
_SELF_RATING = re.compile(
    r"^[^\w\n]*(?:final\s+|overall\s+)?(?:score|rating|grade)\b[^\w\n]*(?:of\s+|is\s+)?"
    r"\d+(?:\.\d+)?\s*(?:(?:/|out\s+of)\s*\d+)?[^\w\n]*$",
    re.IGNORECASE | re.MULTILINE,
)


def drop_self_ratings(text: str) -> str:
    """The text without lines that only state a score, so a document sent for scoring cannot
    steer its own grade (the scoring prompt itself stays byte for byte)."""
    return _SELF_RATING.sub("", text)


def llama2_inst(message: str) -> str:
    """The paper's rendering of a message for a model with no chat template."""
    return f"[INST] {message} [/INST]"


_BACKTRANSLATE = """\
Below is a candidate answer to a question or instruction from an user. Write the most likely question to which the text below would be a great answer.
<response>
Answer in the style of an AI Assistant."""

_SCORE = """\
Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person's perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Please first provide a brief reasoning you used to derive the rating score, and then write "Score: <rating>" in the last line.

<generated instruction>
<output>"""

_REWRITE = """\
Given the draft response to the provided question below, rewrite the draft to improve it, so it is a high quality response to the given question.

Draft Response: <response>

Question: <instruction>

Given the above question, rewrite the draft response to be an improvement over the draft response. It should be as similar as possible, copying text where possible, while making the flow more clear, useful, relevant and providing a direct answer to the question. It should be written to be impeccably tailored to the user's question as if written by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer. Try not to add new facts that are not already in the draft response. Return the rewritten response between [RES] and [/RES]."""

BACKTRANSLATE = Prompt("backtranslate", _BACKTRANSLATE)
SCORE = Prompt("score", _SCORE)
REWRITE = Prompt("rewrite", _REWRITE)
# filtering_distilling (BFT Table 2): the chat model answers the instruction itself, no draft.
DISTILL = Prompt("distill", "<instruction>")

# The pairwise judge (not the paper's, which names GPT-4 as judge without its prompt; docs/method.md
# shows it apart from the method's three):
# one token answers, so a local model's verdict is read from P("1") vs P("2").
JUDGE = Prompt(
    "judge",
    """\
Which of the two answers below better follows the instruction? Judge how helpful, correct, \
clear and complete each answer is; do not prefer an answer for being longer.

Instruction: <instruction>

Answer 1: <first answer>

Answer 2: <second answer>

Reply with the number of the better answer, 1 or 2, and nothing else.""",
)
