"""What a prompt asks for: task type and complexity, from weighted text signals.

Pure and fast (tens of microseconds for a typical prompt, no network, no model): each
task type has patterns with weights; the highest total wins, and the names of the
signals that fired are kept so ``/v1/route/explain`` can show why. Only the last
user message is read, lower-cased once (case-insensitive regexes cost twice as much),
and at most its first and last 1,000 characters, where instructions sit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gateway.call import prompt_text

TASK_TYPES = ("code", "math", "reasoning", "creative", "translation", "summarization", "qa", "chat")
COMPLEXITIES = ("simple", "moderate", "complex")
_WINDOW = 1000

_LANGUAGES = (
    "english|french|spanish|german|italian|portuguese|dutch|swedish|polish|greek|turkish|russian|arabic|hebrew|"
    "chinese|mandarin|japanese|korean|hindi|vietnamese|indonesian|finnish|czech|latin|danish|norwegian|ukrainian"
)

# (task, signal name, weight, pattern); patterns see lower-cased text.
_SIGNALS: list[tuple[str, str, float, str]] = [
    ("code", "code block", 4, r"```|\n\s{4}\S.*\n"),
    (
        "code",
        "programming language",
        2.5,
        r"\b(python|javascript|typescript|java|kotlin|rust|golang|c\+\+|c#|sql|bash|"
        r"shell|css|html|react|flask|django|node\.?js|express|fastapi|spring boot|numpy|pandas|pytest|docker(file)?|"
        r"git|makefile|aiohttp|regex|regular expression)\b|\bin c\b|\bin go\b",
    ),
    (
        "code",
        "code words",
        1.5,
        r"\b(function|method|class|variable|loop|array|pointer|recursive|recursion|compile[rd]?|"
        r"bug|debug|exception|traceback|typeerror|segmentation fault|stack trace|unit tests?|refactor|script|snippet|"
        r"source code|the code|this code|my code|one-liner|endpoint|api endpoint|linked list|binary search|quicksort|"
        r"algorithm|decorator|generator|query|component|re-?renders?)\b",
    ),
    (
        "code",
        "code syntax",
        1.5,
        r"=>|==|!=|\(\)|\w\(\w*\):|;\s*$|\bdef |\bimport |\breturn\b|\bconst |\bprint\(|"
        r"\bfor \w+ in |\bselect\b|\.\w+\(|\{\s*\w+\(\)",
    ),
    ("math", "equation", 3, r"\d\s*[-+*/^=]\s*\(?\d|\b\d*[a-z]\^\d|\b[xy]\s*[-+=]\s*\d|\[\[|\d+\s*/\s*\d+|\d+%"),
    (
        "math",
        "math words",
        2.5,
        r"\b(solve|equation|derivative|differentiate|integral|integrate|limit|probability|"
        r"eigenvalues?|determinant|matrix|vectors?|cross product|prime|factori[sz]ation|greatest common divisor|gcd|"
        r"mean|median|mode|standard deviation|expected value|chance|area|volume|perimeter|hypotenuse|radius|"
        r"triangle|circle|"
        r"cone|diagonals|slope|logarithm|log base|taylor series|differential equation|binary number|decimal|"
        r"compound interest|quadratic|simplify|induction|irrational|strictly increasing|divided by|sum of the first)\b",
    ),
    ("math", "calculate", 1.5, r"\b(calculate|compute|evaluate|how many ways|find the|what is \d|prove)\b"),
    (
        "reasoning",
        "asks why",
        2,
        r"\bwhy\b|\bexplain (why|your|how)|\breason(ing| it out| about| through)?\b|"
        r"\bthink(ing)? (step by step|it through)|\bwalk (me )?through\b|\bjustify\b",
    ),
    (
        "reasoning",
        "weighing options",
        2.5,
        r"\b(pros and cons|trade-?offs?|weigh|argue|argument|assumptions?|fallacy|"
        r"dilemma|ethical|ethics|critically|assess|which is (better|more likely)|more likely|should (i|a|we|the)|"
        r"how should|decide|prioriti[sz]e|recommendation|competing explanations|compare the|consequences|"
        r"analy[sz]e the reasoning|evaluate this)\b",
    ),
    (
        "reasoning",
        "puzzle",
        2.5,
        r"\b(puzzle|riddle|lying|lies|tells the truth|telling the truth|definitely|"
        r"labels? (is|are) wrong|fastest schedule|if it takes|cross (a|the) (river|bridge))\b",
    ),
    (
        "creative",
        "write a piece",
        4,
        r"\b(write|compose|draft|create)\b[^.?!]{0,40}\b(poem|story|haiku|limerick|sonnet|"
        r"song|lyrics|rap|toast|monologue|dialogue|scene|letter|fairy tale|jingle|speech|sketch|rhyme|verse|"
        r"description|diary|opening|tweet|flash fiction|advertisement|character|plot|treasure hunt|epic)\b",
    ),
    (
        "creative",
        "imagination",
        2.5,
        r"\b(imagine|invent|fictional|fantasy|science fiction|sci-fi|poetic|vivid|"
        r"whimsical|catchy|slogan|tagline|creative names|brainstorm|in the style of|bedtime|fairy tale|"
        r"original premises|story|poem)\b",
    ),
    ("translation", "translate", 5, r"\b(translat\w*|traduis|traduce|traduire|render this \w+)\b"),
    (
        "translation",
        "how to say",
        4,
        r"\b(how (do|would|can) (you|i|we) say|c[óo]mo se dice|what does .{1,40} mean in)\b|"
        r"\bin (" + _LANGUAGES + r")\b\??$|\binto (" + _LANGUAGES + r")\b",
    ),
    (
        "translation",
        "foreign text",
        2,
        r"[\u0400-\u04ff\u0590-\u06ff\u0900-\u097f\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]|"
        r"\b(mean|means) in english\b|\bthe (english|" + _LANGUAGES + r") (word|translation|phrase)\b",
    ),
    (
        "summarization",
        "summarize",
        5,
        r"\b(summar(y|ies|i[sz]\w*)|sum up|tl;?dr|gist|condense|shorten|boil (this )?down|"
        r"key (points|takeaways|events)|takeaways|highlights|recap|synopsis|abstract-style|in a nutshell|"
        r"executive summary|bullet points|checklist|in (one|two|three|five|\d+) (sentences?|lines|paragraphs?))\b",
    ),
    ("qa", "factual question", 2, r"^(what|who|when|where|which|how (many|long|tall|far|much|old))\b[^?]{0,80}\?$"),
    ("qa", "definition", 2.5, r"^(define|what is (a|an|the)?\s?\w+\??$|what does \w+ stand for|what is the meaning)"),
    (
        "chat",
        "greeting or small talk",
        3,
        r"^(hi|hello|hey|yo|good (morning|night|evening|afternoon)|thanks?|thank you|"
        r"bye|see you|nice to meet|happy \w+day|lol|haha|hmm|wow|ok|okay|sorry|guess what|i'?m (back|feeling|nervous)|"
        r"i (just|had|miss|don'?t)|are you|can we just|how'?s|what are you up|you'?re|do you (ever|have)|"
        r"it'?s raining|my cat|that makes sense|what should we talk)\b",
    ),
]
_COMPILED = [(task, name, weight, re.compile(pattern, re.MULTILINE)) for task, name, weight, pattern in _SIGNALS]

_COMPLEX_MARKERS = re.compile(
    r"\b(step by step|in detail|detailed|comprehensive|prove|proof|design|architecture|trade-?offs?|compare|"
    r"analy[sz]e|optimi[sz]e|justify|critically|multiple|several|walk me through|implement)\b",
)


@dataclass(frozen=True)
class Analysis:
    task_type: str
    complexity: str
    scores: dict[str, float]
    signals: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_type": self.task_type,
            "complexity": self.complexity,
            "scores": self.scores,
            "signals": self.signals,
        }


prompt_of = prompt_text
"""The text to analyse (kept under its old name)."""


def analyse(text: str) -> Analysis:
    """Task type and complexity of a prompt, with the signals that decided them."""
    text = text.strip()
    if len(text) > 2 * _WINDOW:
        text = text[:_WINDOW] + "\n" + text[-_WINDOW:]
    text = text.lower()
    scores = dict.fromkeys(TASK_TYPES, 0.0)
    signals = []
    for task, name, weight, pattern in _COMPILED:
        if pattern.search(text):
            scores[task] += weight
            signals.append(f"{task}: {name}")
    words = len(text.split())
    best = max(TASK_TYPES, key=lambda t: scores[t])
    if scores[best] < 2:  # nothing decisive: a short line is chat, a question is qa
        best = "qa" if text.endswith("?") and words > 3 and scores["chat"] == 0 else "chat"
        signals.append(f"{best}: no strong signal, {'a question' if best == 'qa' else 'conversation'}")
    return Analysis(best, _complexity(text, words, best), scores, signals)


def _complexity(text: str, words: int, task: str) -> str:
    points = len(_COMPLEX_MARKERS.findall(text))
    points += 2 if words > 150 else 1 if words > 40 else 0
    points += text.count("?") > 1
    points += text.count("\n") > 3
    points += task in ("reasoning", "math", "code") and words > 12
    return COMPLEXITIES[0] if points == 0 else COMPLEXITIES[1] if points <= 2 else COMPLEXITIES[2]
