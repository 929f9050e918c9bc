"""Context-learning evaluation: tasks that teach something in the context and ask about it.

- `format`    — the local task format (JSONL; CL-bench rows load too), prompt rendering
- `judges`    — rule-based judge, OpenAI-compatible endpoint judge (rubrics), AutoJudge
- `synthetic` — seeded generator of invented-knowledge tasks with checkable answers
"""

from metattt.clbench.format import (
    CLBENCH_RESTRICTION,
    CLTask,
    Question,
    check_clbench_licence,
    load_tasks,
    render_prompt,
    save_tasks,
)
from metattt.clbench.judges import AutoJudge, EndpointJudge, RuleJudge, Verdict, check_answer, make_judge
from metattt.clbench.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_tasks

__all__ = [
    "AutoJudge", "CLBENCH_RESTRICTION", "CLTask", "EndpointJudge", "Question", "RuleJudge", "SYNTHETIC_CATEGORIES",
    "Verdict", "check_answer", "check_clbench_licence", "load_tasks", "make_judge", "make_synthetic_tasks", "render_prompt", "save_tasks",
]
