"""Synthetic context-learning tasks: new knowledge defined in the context, checkable answers.

Deterministic under a seed (each task draws from `random.Random(f"{seed}:{category}:{i}")`, so a
task does not change when others are added), offline, small enough for CPU tests. Every word,
name and rule is invented, so no model can answer from pre-training; every answer is checked by
the rule judge (`prefix` on the first line: a language model's continuation runs on past it).

Categories:

- `glossary` — a glossary of invented words; questions ask a word's meaning, or the word for a
  meaning (`qa` prompts).
- `cipher`   — a letter-shift cipher with a task-specific shift and an example; encode / decode.
- `rules`    — an invented operation (the "<name> of a and b" is p·a + q·b) and an invented unit
  conversion; compute with them.
- `python`   — a small module of invented constants, a lookup table and functions; questions are
  lines of code to complete (`assert NAME ==`), so a code LM such as the tiny target (trained
  on the Python standard library) reads them in its own language (`code` prompts). Lookup
  questions need copying from the context; compute questions need applying its definitions.
"""

from __future__ import annotations

import random
import string

from metattt.clbench.format import CLTask, Question

SYNTHETIC_CATEGORIES = ("glossary", "cipher", "rules", "python")
MAX_QUESTIONS_PER_TASK = 8

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl",
           "sk", "st", "tr", "vr", "zh", "th", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee", "y"]
_CODAS = ["", "", "", "n", "r", "x", "k", "sh", "m", "lt", "nd"]

_MEANINGS = ["red", "blue", "green", "yellow", "river", "mountain", "bread", "candle", "horse", "winter",
             "seven", "lantern", "salt", "bridge", "owl", "copper", "garden", "storm", "needle", "apple"]
_PLAIN_WORDS = ["cab", "dog", "sun", "map", "tree", "fish", "lamp", "rose", "milk", "door", "kite", "star",
                "code", "leaf", "bird", "rain"]
_STR_VALUES = ["amber", "cobalt", "violet", "saffron", "ivory", "teal", "ochre", "indigo"]


def invented_word(rng: random.Random, syllables: int | None = None) -> str:
    n = syllables or rng.choice([2, 2, 3])
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
    return word + rng.choice(_CODAS)


def _unique_words(rng: random.Random, n: int, taken: set[str] | None = None) -> list[str]:
    taken = set(taken or ())
    out: list[str] = []
    while len(out) < n:
        w = invented_word(rng)
        if w not in taken and len(w) >= 4:
            taken.add(w)
            out.append(w)
    return out


def _q(question: str, answer: str, kind: str, check_type: str = "prefix") -> Question:
    return Question(question=question, answer=answer, check={"type": check_type, "answer": answer},
                    metadata={"kind": kind})


# --- categories ---------------------------------------------------------------------------------
def _glossary(rng: random.Random, n_questions: int) -> tuple[str, list[Question], str]:
    lang = invented_word(rng, 2).capitalize()
    n = max(4, n_questions + 2)
    words = _unique_words(rng, n)
    meanings = rng.sample(_MEANINGS, n)
    lines = [f"Glossary of the {lang} language. Each {lang} word and its meaning in English:"]
    lines += [f"- {w}: {m}" for w, m in zip(words, meanings)]
    context = "\n".join(lines)
    qs = []
    for j in rng.sample(range(n), n_questions):
        if rng.random() < 0.5:
            qs.append(_q(f"What does the {lang} word '{words[j]}' mean in English?", meanings[j], "meaning"))
        else:
            qs.append(_q(f"What is the {lang} word for '{meanings[j]}'?", words[j], "word"))
    return context, qs, "qa"


def _shift(word: str, k: int) -> str:
    a = string.ascii_lowercase
    return "".join(a[(a.index(c) + k) % 26] for c in word)


def _cipher(rng: random.Random, n_questions: int) -> tuple[str, list[Question], str]:
    name = invented_word(rng, 2).capitalize()
    k = rng.randint(1, 25)
    example, *words = rng.sample(_PLAIN_WORDS, n_questions + 1)
    context = (f"The {name} cipher replaces every letter by the letter {k} {'place' if k == 1 else 'places'} later in the alphabet, "
               f"wrapping around from z to a. For example, '{example}' is written '{_shift(example, k)}' in the "
               f"{name} cipher, and '{_shift(example, k)}' decodes to '{example}'.")
    qs = []
    for w in words:
        if rng.random() < 0.5:
            qs.append(_q(f"Write '{w}' in the {name} cipher.", _shift(w, k), "encode"))
        else:
            qs.append(_q(f"Decode '{_shift(w, k)}' from the {name} cipher.", w, "decode"))
    return context, qs, "qa"


def _rules(rng: random.Random, n_questions: int) -> tuple[str, list[Question], str]:
    op, big, small = _unique_words(rng, 3)
    p, q = rng.randint(2, 5), rng.randint(1, 4)
    rate = rng.randint(3, 9)
    context = (f"Definitions used below.\n"
               f"1. The {op} of two numbers a and b is {p} times a plus {q} times b. "
               f"For example, the {op} of 1 and 1 is {p + q}.\n"
               f"2. One {big} is worth exactly {rate} {small}s.")
    qs: list[Question] = []
    seen: set[str] = set()
    while len(qs) < n_questions:
        if rng.random() < 0.5:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            new = _q(f"What is the {op} of {a} and {b}?", str(p * a + q * b), "operation")
        else:
            n = rng.randint(2, 12)
            new = _q(f"How many {small}s are {n} {big}s worth?", str(n * rate), "conversion")
        if new.question not in seen:
            seen.add(new.question)
            qs.append(new)
    return context, qs, "qa"


def _python(rng: random.Random, n_questions: int) -> tuple[str, list[Question], str]:
    module, const_i, const_s, table, fn_lin, fn_str = _unique_words(rng, 6)
    int_value = rng.randint(11, 99)
    str_value = rng.choice(_STR_VALUES)
    keys = _unique_words(rng, 3, {module, const_i, const_s, table, fn_lin, fn_str})
    vals = [rng.randint(2, 60) for _ in keys]
    mul, add = rng.randint(2, 7), rng.randint(1, 9)
    suffix = rng.choice(["_x", "_v2", "_ok", "_end"])
    CI, CS, TB = const_i.upper(), const_s.upper(), table.upper()
    context = "\n".join([
        f'"""The {module} module: constants and helpers."""',
        "",
        f"{CI} = {int_value}",
        f"{CS} = '{str_value}'",
        f"{TB} = {{" + ", ".join(f"'{k}': {v}" for k, v in zip(keys, vals)) + "}",
        "",
        "",
        f"def {fn_lin}(x):",
        f"    return x * {mul} + {add}",
        "",
        "",
        f"def {fn_str}(name):",
        f"    return name + '{suffix}'",
        "",
    ])
    pool = [
        (f"assert {CI} ==", str(int_value), "lookup"),
        (f"assert {CS} ==", f"'{str_value}'", "lookup"),
        *[(f"assert {TB}['{k}'] ==", str(v), "lookup") for k, v in zip(keys, vals)],
        *[(f"assert {fn_lin}({x}) ==", str(x * mul + add), "compute") for x in rng.sample(range(1, 10), 2)],
        (f"assert {fn_str}('{keys[0]}') ==", f"'{keys[0]}{suffix}'", "compute"),
    ]
    picks = rng.sample(pool, min(n_questions, len(pool)))
    return context, [_q(q, a, kind) for q, a, kind in picks], "code"


_BUILDERS = {"glossary": _glossary, "cipher": _cipher, "rules": _rules, "python": _python}


def make_synthetic_tasks(categories: list[str] | tuple[str, ...] = SYNTHETIC_CATEGORIES, num_tasks: int = 4,
                         questions_per_task: int = 3, seed: int = 0) -> list[CLTask]:
    """`num_tasks` tasks per category, each with `questions_per_task` questions; same seed, same tasks."""
    unknown = [c for c in categories if c not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {SYNTHETIC_CATEGORIES}")
    if not 1 <= questions_per_task <= MAX_QUESTIONS_PER_TASK:
        raise ValueError(f"questions_per_task must be in 1..{MAX_QUESTIONS_PER_TASK}, got {questions_per_task}")
    tasks = []
    for category in categories:
        for i in range(num_tasks):
            rng = random.Random(f"{seed}:{category}:{i}")
            context, questions, style = _BUILDERS[category](rng, questions_per_task)
            tasks.append(CLTask(id=f"{category}-{seed}-{i:04d}", category=category, context=context,
                                questions=questions, prompt_style=style,
                                metadata={"generator": "metattt.clbench.synthetic", "seed": seed}))
    return tasks
