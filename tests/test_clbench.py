"""Context-learning harness: task format, rule and endpoint judges, synthetic tasks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from metattt.clbench import (
    SYNTHETIC_CATEGORIES,
    AutoJudge,
    CLTask,
    EndpointJudge,
    Question,
    RuleJudge,
    check_answer,
    load_tasks,
    make_judge,
    make_synthetic_tasks,
    render_prompt,
    save_tasks,
)
from metattt.clbench.judges import normalize, parse_score

TASK = CLTask(id="t0", category="c", context="ctx", questions=[Question("q?")])


# --- rule judge ---------------------------------------------------------------------------------
@pytest.mark.parametrize("check,right,wrong", [
    ({"type": "exact", "answer": "Blue"}, "  Blue\nand more", "blue"),
    ({"type": "normalized", "answer": "Blue sky"}, " 'blue   SKY.'\nmore", "blue skies"),
    ({"type": "prefix", "answer": "37"}, " 37 + x\n", "370"),
    ({"type": "prefix", "answer": "'amber'"}, ' "amber"', "'amber_x'"),
    ({"type": "prefix", "answer": "vor"}, "vor.", "vorn"),
    ({"type": "regex", "pattern": r"^\d+ glorps?$", "flags": "i"}, "12 Glorps", "twelve glorps"),
    ({"type": "contains_all", "values": ["red", "blue"]}, "Red and blue", "red and green"),
    ({"type": "contains_any", "values": ["red", "blue"]}, "only blue", "green"),
    ({"type": "normalized", "answers": ["7", "seven"]}, "Seven!", "eight"),
    ({"type": "contains_all", "values": ["a1", "b2"], "extract": "full"}, "a1\nb2", "a1\nc3"),
])
def test_rule_checks_score_right_and_wrong(check, right, wrong):
    judge = RuleJudge()
    q = Question("?", check=check)
    assert judge(TASK, q, right).score == 1.0 and judge(TASK, q, right).passed
    assert judge(TASK, q, wrong).score == 0.0 and judge(TASK, q, wrong).passed is False


def test_rule_judge_defaults_and_ungraded():
    judge = RuleJudge()
    assert judge(TASK, Question("?", answer="Paris"), "paris.").score == 1.0  # default: normalized
    assert judge(TASK, Question("?", answer="Paris"), "Lyon").score == 0.0
    assert judge(TASK, Question("?", answer="4", check={"type": "prefix"}), "4 apples").score == 1.0
    v = judge(TASK, Question("?", rubric=["mentions X"]), "X")
    assert v.score is None and v.passed is None
    assert judge(TASK, Question("?", answer="x"), "").score == 0.0
    with pytest.raises(ValueError):
        check_answer({"type": "fuzzy", "answer": "x"}, "x")
    assert normalize('  "Hello,   World!" ') == "hello, world"


# --- format -------------------------------------------------------------------------------------
def test_task_format_round_trips(tmp_path):
    tasks = [
        CLTask(id="a", category="rules", context="A zib is 3 zabs.", prompt_style="qa", system="Be brief.",
               questions=[Question("How many zabs in 2 zibs?", answer="6", check={"type": "prefix", "answer": "6"},
                                   rubric=["says 6"], metadata={"kind": "conversion"}),
                          Question("Unicode ok? é→ü", answer="ja")],
               metadata={"seed": 1, "nested": {"x": [1, 2]}}),
        *make_synthetic_tasks(["python", "cipher"], num_tasks=2, questions_per_task=2, seed=5),
    ]
    path = save_tasks(tasks, tmp_path / "tasks.jsonl")
    assert load_tasks(path) == tasks
    # a JSON list, and a folder, load too
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.json").write_text(json.dumps([t.to_dict() for t in tasks[:2]]))
    assert load_tasks(tmp_path / "more") == tasks[:2]
    with pytest.raises(ValueError, match="record 0"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x"}) + "\n")
        load_tasks(tmp_path / "bad.jsonl")


def test_clbench_rows_load_as_rubric_tasks(tmp_path):
    row = {"messages": [{"role": "system", "content": "You are a tax clerk of Zandor."},
                        {"role": "user", "content": "Zandor law: tax is 7%.\n\nWhat is the tax on 100?"}],
           "rubrics": ["The response states 7.", {"rubric_criteria": "No other rates are used."}],
           "metadata": {"task_id": "abc", "context_id": "ctx1", "context_category": "Rule System Application",
                        "sub_category": "Legal"}}
    (tmp_path / "cl.jsonl").write_text(json.dumps(row) + "\n")
    [task] = load_tasks(tmp_path / "cl.jsonl")
    assert task.id == "abc" and task.category == "Rule System Application" and task.prompt_style == "chat"
    assert task.system.startswith("You are") and task.questions[0].question.endswith("on 100?")
    assert task.questions[0].rubric == ["The response states 7.", "No other rates are used."]
    assert not task.questions[0].checkable
    text = render_prompt(task, 0)  # no tokenizer: a plain qa prompt
    assert text.startswith("You are a tax clerk") and text.endswith("Answer:") and "7%" in text
    # round trip keeps it
    save_tasks([task], tmp_path / "ours.jsonl")
    assert load_tasks(tmp_path / "ours.jsonl") == [task]
    # the auto judge leaves rubric-only questions ungraded without an endpoint
    assert AutoJudge()(task, task.questions[0], "7").score is None


def test_render_prompt_styles(workspace):
    from transformers import AutoTokenizer

    qa = CLTask("a", "g", "Glossary:\n- zib: red\n", [Question("What is zib?", answer="red")])
    assert render_prompt(qa, 0) == "Glossary:\n- zib: red\n\nQuestion: What is zib?\nAnswer:"
    code = CLTask("b", "python", "X = 3\n", [Question("assert X ==", answer="3")], prompt_style="code")
    assert render_prompt(code, 0) == "X = 3\n\n\nassert X =="
    chat = CLTask("c", "g", "zib means red", [Question("What is zib?")], system="Answer briefly.", prompt_style="chat")
    tok = AutoTokenizer.from_pretrained(workspace / "target")
    text = render_prompt(chat, 0, tok)
    assert "zib means red" in text and "Answer briefly." in text and text != render_prompt(chat, 0)


# --- synthetic tasks ----------------------------------------------------------------------------
def test_synthetic_tasks_are_deterministic_and_checkable():
    a = make_synthetic_tasks(num_tasks=3, questions_per_task=4, seed=11)
    b = make_synthetic_tasks(num_tasks=3, questions_per_task=4, seed=11)
    assert a == b
    assert a != make_synthetic_tasks(num_tasks=3, questions_per_task=4, seed=12)
    # a task does not change when more are generated
    assert make_synthetic_tasks(["cipher"], num_tasks=5, questions_per_task=4, seed=11)[:3] == [
        t for t in a if t.category == "cipher"]
    assert {t.category for t in a} == set(SYNTHETIC_CATEGORIES) and len(a) == 3 * len(SYNTHETIC_CATEGORIES)
    judge = RuleJudge()
    for t in make_synthetic_tasks(num_tasks=6, questions_per_task=8, seed=3):
        assert len(t.questions) == 8 and len({q.question for q in t.questions}) == 8
        for q in t.questions:
            assert q.checkable and q.answer
            prompt = render_prompt(t, q)
            assert prompt.startswith(t.context.rstrip()) and prompt.endswith(q.question if t.prompt_style == "code"
                                                                             else "Answer:")
            # the reference answer is correct, also as a language model would continue it
            assert judge(t, q, q.answer).score == 1.0, (t.id, q)
            assert judge(t, q, f" {q.answer}\n{t.context}").score == 1.0, (t.id, q)
            # another question's answer is not (unless it happens to be the same)
            others = {o.answer for o in t.questions} - {q.answer}
            for other in others:
                if normalize(other) != normalize(q.answer):
                    assert judge(t, q, other).score == 0.0, (t.id, q.answer, other)


def test_synthetic_answers_need_the_context():
    """The definitions the answers come from are stated in the context."""
    for t in make_synthetic_tasks(["glossary", "python"], num_tasks=4, questions_per_task=3, seed=0):
        for q in t.questions:
            if q.metadata["kind"] in ("meaning", "word", "lookup"):
                assert normalize(q.answer) in normalize(t.context), (t.id, q)
    with pytest.raises(ValueError):
        make_synthetic_tasks(["poetry"])
    with pytest.raises(ValueError):
        make_synthetic_tasks(questions_per_task=9)


# --- endpoint judge (against a local stub server only) ------------------------------------------
class _Stub:
    """An OpenAI-compatible /chat/completions stub on 127.0.0.1 only. It answers at most `limit`
    requests (503 after that), and stops itself: on leaving the `with` block, or after `lifetime_s`."""

    def __init__(self, replies: list[tuple[int, str]], limit: int = 10, lifetime_s: float = 30.0):
        self.replies, self.requests = list(replies), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if len(stub.requests) > limit:
                    status, content = 503, "over the stub's request limit"
                else:
                    status, content = stub.replies.pop(0) if stub.replies else (200, '{"overall_score": 0}')
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.server.shutdown)
        self.timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_endpoint_judge_grades_rubrics_through_a_local_stub(monkeypatch):
    monkeypatch.setenv("METATTT_TEST_JUDGE_KEY", "dummy-key-for-the-stub")
    task = CLTask("r1", "rules", "In Zandor tax is 7%.", [Question("Tax on 100?", rubric=["States 7.", "No 8."])])
    q = task.questions[0]
    replies = [(200, '```json\n{"rationale": "ok", "requirement_status": ["yes", "yes"], "overall_score": 1}\n```'),
               (200, '{"Overall Score": 0}'),
               (500, "server error"), (200, "garbage"), (200, "Overall score: 1")]
    with _Stub(replies, limit=6) as stub:
        judge = EndpointJudge(stub.url, "grader", api_key_env="METATTT_TEST_JUDGE_KEY", timeout_s=5, max_retries=2)
        assert judge(task, q, "7").score == 1.0
        assert judge(task, q, "8").score == 0.0
        v = judge(task, q, "7")  # 500, then unparseable, then a plain-text score: retried, bounded
        assert v.score == 1.0
        assert judge(task, q, "   ").score == 0.0  # empty response: no call
        auto = make_judge("auto", base_url=stub.url, api_key_env="METATTT_TEST_JUDGE_KEY", timeout_s=5, max_retries=0)
        assert auto(task, Question("x", answer="7"), "7").judge == "rule"  # checkable: the rule judge, no call
    assert len(stub.requests) == 5
    first = stub.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer dummy-key-for-the-stub"
    prompt = first["body"]["messages"][1]["content"]
    assert "1. States 7." in prompt and "2. No 8." in prompt and "In Zandor tax is 7%." in prompt
    assert first["body"]["model"] == "grader" and first["body"]["temperature"] == 0.0


def test_endpoint_judge_failure_scores_zero_and_is_bounded():
    import time

    with _Stub([], limit=0) as stub:  # stopped below: connections to its port are refused
        url = stub.url
    judge = EndpointJudge(url, "grader", api_key_env=None, timeout_s=1, max_retries=1)
    t0 = time.perf_counter()
    v = judge(TASK, Question("?", rubric=["r"]), "answer")
    assert v.score == 0.0 and "error" in v.details and time.perf_counter() - t0 < 10
    assert parse_score('{"overall_score": 0.5}') is None and parse_score("no score") is None
    with pytest.raises(ValueError):
        make_judge("endpoint")
