"""The local context-learning task format, and a reader for public CL-bench rows.

A task gives new knowledge in its `context` (rules, a glossary, code the model has never seen)
and asks `questions` whose answers need it. One JSON object per line (`.jsonl`), or a JSON list:

    {"id": "python-0003",
     "category": "python",
     "context": "BLORK_LIMIT = 37\\n...",
     "system": null,                       # optional system prompt (chat style)
     "prompt_style": "code",               # qa | code | chat  (how a question becomes a prompt)
     "questions": [
        {"question": "assert BLORK_LIMIT ==",
         "answer": "37",                   # optional reference answer
         "check": {"type": "prefix", "answer": "37"},   # optional rule for the rule-based judge
         "rubric": ["The response gives 37."],          # optional criteria for a rubric (LLM) judge
         "metadata": {"kind": "lookup"}}],
     "metadata": {"seed": 0}}

Rows of the public CL-bench data (tencent/CL-bench: `messages` in OpenAI chat format — a system
prompt, then a user turn holding context and task —, `rubrics`, `metadata` with `task_id`,
`context_id`, `context_category`, `sub_category`) load as one task with one question each:
`prompt_style` "chat", the conversation kept in `metadata["messages"]`, the rubrics as the
question's rubric. They have no checkable answer, so only a rubric (endpoint) judge grades them.

CL-bench's licence allows evaluation only (`CLBENCH_RESTRICTION`): `check_clbench_licence` refuses
to adapt a drafter on its rows (TTT is parameter updating) unless the caller opts in explicitly.

`render_prompt` turns (task, question) into the text the model continues:

- `qa`:   "{context}\\n\\nQuestion: {question}\\nAnswer:"
- `code`: "{context}\\n\\n\\n{question}" — the question is a line of code to complete (for code LMs)
- `chat`: the tokenizer's chat template over [system, user: context + question] (or the stored
  CL-bench conversation), with the generation prompt; `qa` when the tokenizer has no template.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metattt.errors import RecipeError

PROMPT_STYLES = ("qa", "code", "chat")
CLBENCH_SOURCE = "cl-bench"
#: The restriction in the tencent/CL-bench dataset card's licence (evaluation, testing and benchmarking only).
CLBENCH_RESTRICTION = ("must not be used for training, fine-tuning, calibrating, distilling, adapting, or any form "
                       "of parameter updating")


@dataclass
class Question:
    question: str
    answer: str | None = None
    """Reference answer (what the rule judge compares against when `check` has none)."""
    check: dict | None = None
    """Rule for the rule-based judge, e.g. {"type": "normalized", "answer": "blue"} (see judges.py)."""
    rubric: list[str] | None = None
    """Grading criteria for a rubric judge (an LLM behind an OpenAI-compatible endpoint)."""
    metadata: dict = field(default_factory=dict)

    @property
    def checkable(self) -> bool:
        return self.check is not None or self.answer is not None


@dataclass
class CLTask:
    id: str
    category: str
    context: str
    questions: list[Question]
    system: str | None = None
    prompt_style: str = "qa"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"task {self.id}: prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        self.questions = [q if isinstance(q, Question) else Question(**q) for q in self.questions]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLTask:
        if "messages" in d and "questions" not in d:
            return from_clbench_row(d)
        missing = [k for k in ("id", "context", "questions") if k not in d]
        if missing:
            raise ValueError(f"task record misses {missing}: expected {{id, category, context, questions:[...]}} "
                             f"or a CL-bench row {{messages, rubrics, metadata}}; got keys {sorted(d)}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("category", "default")
        return cls(**known)


def _rubric_text(r: Any) -> str:
    if isinstance(r, dict):  # CL-bench rubrics are strings; some tools store {"rubric_criteria": ...}
        return str(r.get("rubric_criteria") or r.get("criteria") or r.get("text") or json.dumps(r))
    return str(r)


def from_clbench_row(row: dict, index: int = 0) -> CLTask:
    """One public CL-bench row -> a task with one rubric-graded question (no checkable answer)."""
    messages = list(row.get("messages") or [])
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("CL-bench row: `messages` must end with a user turn (the context and the task)")
    meta = dict(row.get("metadata") or {})
    system = messages[0]["content"] if messages[0].get("role") == "system" else None
    history = [m for m in messages[:-1] if m.get("role") != "system"]
    context = "\n\n".join(str(m.get("content", "")) for m in history)
    task_id = str(meta.get("task_id") or row.get("id") or row.get("idx") or f"clbench-{index:05d}")
    rubrics = [_rubric_text(r) for r in row.get("rubrics") or []] or None
    return CLTask(
        id=task_id, category=str(meta.get("context_category") or "uncategorized"), context=context,
        questions=[Question(question=str(messages[-1].get("content", "")), rubric=rubrics)],
        system=system, prompt_style="chat", metadata={**meta, "messages": messages, "source": CLBENCH_SOURCE},
    )


def check_clbench_licence(tasks: list[CLTask], adapts: bool, allowed: bool, what: str, opt_in: str) -> None:
    """Refuse to adapt parameters on CL-bench rows: their licence forbids "any form of parameter
    updating", and test-time training on a row's context is one. Evaluating without TTT is allowed.

    `adapts`: whether the run updates the drafter on the tasks (`what` says how, for the message);
    `allowed`: the explicit opt-in (`opt_in` names it).
    """
    rows = sum(t.metadata.get("source") == CLBENCH_SOURCE for t in tasks)
    if adapts and rows and not allowed:
        raise RecipeError(
            f"{rows} of the tasks are CL-bench rows, and CL-bench's licence (the tencent/CL-bench dataset card) "
            f"says its data \"{CLBENCH_RESTRICTION}\"; {what} adapts the drafter's parameters on them. Evaluate "
            f"them without TTT, or set {opt_in}=true only where you hold other rights to the data")


def load_tasks(path: str | Path | list[str | Path]) -> list[CLTask]:
    """Tasks from .jsonl / .json files (or folders of them); our format or CL-bench rows."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted([*p.glob("*.jsonl"), *p.glob("*.json")])
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no task file {p}")
    tasks: list[CLTask] = []
    for f in files:
        if f.suffix == ".json":
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise RecipeError(f"{f}: line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
            rows = data if isinstance(data, list) else data.get("tasks", [data])
        else:
            rows = []
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise RecipeError(f"{f}: line {n}: invalid JSON ({e.msg}, column {e.colno}): fix or "
                                          "remove that line (one task per line)") from e
        for i, row in enumerate(rows):
            try:
                tasks.append(from_clbench_row(row, len(tasks)) if "messages" in row and "questions" not in row
                             else CLTask.from_dict(row))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{f}: record {i}: {e}") from e
    return tasks


def save_tasks(tasks: list[CLTask], path: str | Path) -> Path:
    """Write tasks as JSONL (atomically); `load_tasks` reads them back equal."""
    from metattt.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tasks))
    return path


def render_prompt(task: CLTask, question: Question | int, tokenizer=None) -> str:
    """The text the model continues for one question (see the module docstring)."""
    q = task.questions[question] if isinstance(question, int) else question
    style = task.prompt_style
    if style == "chat":
        template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if template:
            messages = task.metadata.get("messages")
            if not messages or task.metadata.get("source") != "cl-bench":
                user = f"{task.context}\n\n{q.question}" if task.context else q.question
                messages = ([{"role": "system", "content": task.system}] if task.system else []) + [
                    {"role": "user", "content": user}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        style = "qa"
    if style == "code":
        return f"{task.context.rstrip()}\n\n\n{q.question}"
    head = "\n\n".join(p.strip() for p in (task.system, task.context) if p and p.strip())
    return f"{head}\n\nQuestion: {q.question}\nAnswer:" if head else f"Question: {q.question}\nAnswer:"
