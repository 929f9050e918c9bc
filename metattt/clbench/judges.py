"""Pluggable judges: a rule-based judge for checkable answers, an OpenAI-compatible endpoint
judge for rubric grading, and `AutoJudge`, which picks one per question.

A judge is any callable `judge(task, question, response) -> Verdict`.

Rule checks (`Question.check`, or {"type": <default>, "answer": Question.answer}):

| type          | passes when (on the extracted response)                                   |
|---------------|---------------------------------------------------------------------------|
| exact         | text == answer (surrounding whitespace ignored)                           |
| normalized    | normalize(text) == normalize(answer)                                      |
| prefix        | normalize(text) starts with normalize(answer) at a word boundary          |
| regex         | re.search(pattern, text) (flags: "i", "m", "s" in `flags`)                |
| contains_all  | every normalize(value) of `values` occurs in normalize(text)              |
| contains_any  | at least one does                                                         |

`answers` (a list) may replace `answer`: any of them passes. `extract` chooses the text checked:
"first_line" (default: the first non-empty line; a language model's continuation runs on past
its answer) or "full". normalize = lower case, whitespace collapsed, surrounding quotes,
backticks and final punctuation (. , ; : ! ?) removed.

The endpoint judge follows CL-bench's grading contract: a strict binary score, 1 only if the
response meets every rubric item, 0 otherwise, and 0 when the call or the parsing fails
(conservative; the failure is recorded in `details`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from metattt.clbench.format import CLTask, Question
from metattt.endpoint import EndpointError, request_json

log = logging.getLogger("metattt")

RULE_TYPES = ("exact", "normalized", "prefix", "regex", "contains_all", "contains_any")


@dataclass
class Verdict:
    score: float | None
    """1.0 pass / 0.0 fail; None: not graded (no rule applies and no endpoint judge)."""
    judge: str
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return None if self.score is None else self.score >= 1.0


class Judge(Protocol):
    name: str

    def __call__(self, task: CLTask, question: Question, response: str) -> Verdict: ...


# --- rule-based -------------------------------------------------------------------------------
_EDGE = " \t\n\"'`"
_TRAILING = ".,;:!?"


def normalize(text: str) -> str:
    text = " ".join(str(text).lower().split())
    prev = None
    while prev != text:
        prev = text
        text = text.strip(_EDGE).rstrip(_TRAILING)
    return text


def extract(response: str, how: str = "first_line") -> str:
    if how == "full":
        return response.strip()
    if how != "first_line":
        raise ValueError(f"check.extract must be 'first_line' or 'full', got {how!r}")
    for line in response.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _prefix_match(text: str, answer: str) -> bool:
    if not answer or not text.startswith(answer):
        return False
    if len(text) == len(answer) or not (answer[-1].isalnum() or answer[-1] == "_"):
        return True
    nxt = text[len(answer)]
    return not (nxt.isalnum() or nxt == "_")


def check_answer(check: dict, response: str) -> tuple[bool, str]:
    """Apply one rule (see the table above) -> (passed, the text that was checked)."""
    kind = check.get("type", "normalized")
    if kind not in RULE_TYPES:
        raise ValueError(f"unknown check type {kind!r}; choose one of {RULE_TYPES}")
    text = extract(response, check.get("extract", "first_line"))
    if kind == "regex":
        flags = 0
        for ch in check.get("flags", ""):
            flags |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[ch]
        return re.search(check["pattern"], text, flags) is not None, text
    if kind in ("contains_all", "contains_any"):
        values = [normalize(v) for v in check["values"]]
        hits = [v in normalize(text) for v in values]
        return (all(hits) if kind == "contains_all" else any(hits)), text
    answers = check.get("answers") or [check["answer"]]
    if kind == "exact":
        return any(text == str(a).strip() for a in answers), text
    norm = normalize(text)
    if kind == "normalized":
        return any(norm == normalize(a) for a in answers), text
    return any(_prefix_match(norm, normalize(a)) for a in answers), text


class RuleJudge:
    """Scores questions with a checkable answer; others are left ungraded (score None)."""

    name = "rule"

    def __init__(self, default_type: str = "normalized"):
        if default_type not in RULE_TYPES:
            raise ValueError(f"default_type must be one of {RULE_TYPES}")
        self.default_type = default_type

    def rule_for(self, question: Question) -> dict | None:
        if question.check is not None:
            check = dict(question.check)
            if "answer" not in check and "answers" not in check and question.answer is not None:
                check["answer"] = question.answer
            return check
        if question.answer is not None:
            return {"type": self.default_type, "answer": question.answer}
        return None

    def __call__(self, task: CLTask, question: Question, response: str) -> Verdict:
        check = self.rule_for(question)
        if check is None:
            return Verdict(None, self.name, {"reason": "no answer or check to compare with"})
        ok, text = check_answer(check, response)
        return Verdict(1.0 if ok else 0.0, self.name, {"type": check.get("type", "normalized"), "checked": text})


# --- OpenAI-compatible endpoint (rubric grading) ------------------------------------------------
GRADER_SYSTEM = (
    "You are a strict grader. You receive a context, a task, a list of requirements (rubrics) and a "
    "response. Judge the response only against the requirements, using the context as the source of "
    "truth. Score 1 only if the response satisfies every requirement; score 0 if any requirement is "
    "missing, wrong or violated. Reply with JSON only: "
    '{"rationale": "...", "requirement_status": ["yes" or "no", ...], "overall_score": 0 or 1}'
)


def _grader_prompt(task: CLTask, question: Question, response: str, max_context_chars: int) -> str:
    rubric = list(question.rubric or [])
    if not rubric and question.answer is not None:
        rubric = [f"The response gives the answer: {question.answer}"]
    context = task.context
    if task.metadata.get("source") == "cl-bench":
        context = "\n\n".join(f"[{m.get('role')}]\n{m.get('content', '')}" for m in task.metadata["messages"])
    if len(context) > max_context_chars:
        context = context[:max_context_chars] + "\n[... context truncated ...]"
    items = "\n".join(f"{i}. {r}" for i, r in enumerate(rubric, 1))
    return (f"## Context\n{context}\n\n## Task\n{question.question}\n\n## Requirements\n{items}\n\n"
            f"## Response\n{response}\n")


_SCORE_RE = re.compile(r"overall[ _]score\W{0,4}([01](?:\.0+)?)", re.IGNORECASE)


def parse_score(content: str) -> float | None:
    """The 0/1 overall score in a grader reply (JSON, possibly fenced; or 'overall score: 1')."""
    match = re.search(r"\{.*\}", content, re.DOTALL)
    if match:
        try:
            obj = json.loads(match.group(0))
            for key in ("overall_score", "Overall Score", "score", "overall score"):
                if key in obj:
                    value = float(obj[key])
                    return value if value in (0.0, 1.0) else None
        except (ValueError, TypeError):
            pass
    m = _SCORE_RE.search(content)
    return float(m.group(1)) if m else None


class EndpointJudge:
    """Rubric grading by a model behind an OpenAI-compatible `/chat/completions` endpoint.

    Requests go through metattt.endpoint. The API key is read from the environment variable
    named by `api_key_env` (nothing is sent when it is unset, for local servers). At most
    `max_retries` + 1 attempts per question, each bounded by `timeout_s`.
    """

    name = "endpoint"

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 2, max_context_chars: int = 60_000,
                 temperature: float = 0.0):
        if not base_url:
            raise ValueError("EndpointJudge needs a base_url, e.g. http://127.0.0.1:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout_s = model, api_key_env, timeout_s
        self.max_retries, self.max_context_chars, self.temperature = max_retries, max_context_chars, temperature

    def _post(self, payload: dict) -> dict:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return request_json(self.url, payload, api_key=key, timeout_s=self.timeout_s)

    def __call__(self, task: CLTask, question: Question, response: str) -> Verdict:
        if not question.rubric and question.answer is None:
            return Verdict(None, self.name, {"reason": "no rubric or answer to grade against"})
        if not response.strip():
            return Verdict(0.0, self.name, {"reason": "empty response"})
        payload = {"model": self.model, "temperature": self.temperature, "messages": [
            {"role": "system", "content": GRADER_SYSTEM},
            {"role": "user", "content": _grader_prompt(task, question, response, self.max_context_chars)}]}
        error = ""
        for attempt in range(self.max_retries + 1):
            try:
                content = self._post(payload)["choices"][0]["message"]["content"]
                score = parse_score(content)
                if score is not None:
                    return Verdict(score, self.name, {"reply": content[:2000]})
                error = f"unparseable grader reply: {content[:200]!r}"
            except (EndpointError, ValueError, KeyError, IndexError, TypeError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                time.sleep(min(0.25 * 2**attempt, 2.0))
        log.warning("endpoint judge failed on task %s: %s (scored 0)", task.id, error)
        return Verdict(0.0, self.name, {"error": error})


class AutoJudge:
    """The rule judge where a question has a checkable answer, else the endpoint judge (if any)."""

    name = "auto"

    def __init__(self, rule: RuleJudge | None = None, endpoint: EndpointJudge | None = None):
        self.rule, self.endpoint = rule or RuleJudge(), endpoint

    def __call__(self, task: CLTask, question: Question, response: str) -> Verdict:
        if self.rule.rule_for(question) is not None:
            return self.rule(task, question, response)
        if self.endpoint is not None:
            return self.endpoint(task, question, response)
        return Verdict(None, self.name, {"reason": "rubric-only question and no endpoint judge configured"})


def make_judge(kind: str = "auto", base_url: str | None = None, model: str = "gpt-4o-mini",
               api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0, max_retries: int = 2,
               default_type: str = "normalized") -> Judge:
    """`rule`, `endpoint` (needs base_url) or `auto` (rule where checkable, endpoint where configured)."""
    endpoint = EndpointJudge(base_url, model, api_key_env, timeout_s, max_retries) if base_url else None
    if kind == "rule":
        return RuleJudge(default_type)
    if kind == "endpoint":
        if endpoint is None:
            raise ValueError("judge=endpoint needs judge_base_url (an OpenAI-compatible server, e.g. http://host:8000/v1)")
        return endpoint
    if kind == "auto":
        return AutoJudge(RuleJudge(default_type), endpoint)
    raise ValueError(f"unknown judge {kind!r}; choose rule, endpoint or auto")
