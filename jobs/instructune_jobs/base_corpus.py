"""The general corpus the quickstart's tiny base is pre-trained on (tiny_base.py).

Instruction tuning teaches a pre-trained model behaviour and format; it cannot give it abilities it
lacks. Extraction needs two: copying a span of the input (a name, a number) and recalling what a
real base knows about the spans (that "March" is month 03, that "$7,313.00" is the number 7313).
This corpus teaches those, in plain prose, together with small general tasks (synthetic.general_rows)
that the forgetting probe measures. It never contains the extraction task itself: no contract
clauses, no JSON, no keys party/amount/date — the base model answers the quickstart's questions in
prose (its `jsonSchema` is ~0) until it is tuned.

Rows are chat conversations (the `messages` format), so the project's own data pipeline and
training recipe pre-train the base. Deterministic for a seed.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable

from instructune_jobs.synthetic import _MONTHS, _WORDS, _general_row
from instructune_jobs.synthetic import _party as _org

_PEOPLE = [
    "Ada Moreno",
    "Ben Okafor",
    "Chen Wei",
    "Dana Kowalski",
    "Elif Demir",
    "Farid Haddad",
    "Greta Lindqvist",
    "Hugo Martins",
    "Ines Duarte",
    "Jonas Weber",
    "Kira Tanaka",
    "Liam Byrne",
    "Mira Patel",
    "Noah Fischer",
    "Olga Ivanova",
    "Pablo Ruiz",
]
_CITIES = [
    "Lisbon",
    "Osaka",
    "Denver",
    "Krakow",
    "Nairobi",
    "Quebec",
    "Bergen",
    "Porto",
    "Dublin",
    "Seville",
    "Perth",
    "Tallinn",
]
# Narrative sentences, unlike the extraction task's contract clauses.
_PASSAGES = [
    "{person} from {org} visited {city} on {date} and spent {amount} on new equipment.",
    "On {date}, {org} opened an office in {city}; {person} said the move cost {amount}.",
    "The report by {person} notes that {org} raised {amount} in {city} on {date}.",
    "{org} hired {person} in {city}. The first budget, {amount}, was approved on {date}.",
    "In {city}, a grant of {amount} went to {org} on {date}, according to {person}.",
    "{person} met the team of {org} on {date}. They talked about {amount} for the {city} project.",
    "A shipment worth {amount} left {city} for {org} on {date}; {person} signed for it.",
    "Since {date}, {person} has led {org} in {city}, where sales reached {amount}.",
]
_ASK = {
    "org": [
        "Which organization is mentioned?",
        "Name the company in the text.",
        "What is the name of the organization?",
    ],
    "person": ["Who is the person mentioned?", "Name the person in the text."],
    "city": ["Which city is mentioned?", "Where did it happen?"],
    "amount": [
        "What is the amount, as a plain whole number?",
        "How much money is mentioned? Answer with digits only.",
        "Give the sum of money as an integer.",
    ],
    "date": [
        "On what date? Write it as YYYY-MM-DD.",
        "Give the date in ISO format.",
        "When did it happen? Answer in the form YYYY-MM-DD.",
    ],
}


def _amount(rng: random.Random) -> tuple[int, str]:
    value = rng.choice([rng.randrange(10, 10_000), rng.randrange(1_000, 1_000_000, rng.choice([1, 5, 50]))])
    shown = rng.choice(["${:,}", "USD {:,}", "{:,} dollars", "${:,}.00", "{:,} USD", "EUR {:,}"]).format(
        value
    )
    return value, shown


def _date(rng: random.Random) -> tuple[str, str]:
    day = dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(0, 15 * 365))
    month = _MONTHS[day.month - 1]
    shown = rng.choice(
        [
            f"{month} {day.day}, {day.year}",
            f"{day.day} {month} {day.year}",
            day.isoformat(),
            f"{month[:3]} {day.day}, {day.year}",
        ]
    )
    return day.isoformat(), shown


def _chat(user: str, assistant: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


_LABELS = {
    "org": ["Organization", "Company", "Firm"],
    "person": ["Person", "Name", "Contact"],
    "city": ["City", "Place", "Location"],
    "amount": ["Amount", "Sum", "Money"],
    "date": ["Date", "Day", "When"],
}
_LIST_ASKS = [
    "List the facts.",
    "What are the key facts?",
    "Summarize the facts, one per line.",
    "Note the details.",
]


def _passage(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A short narrative and its spans in normal form (amount as an integer, date as ISO)."""
    amount, amount_text = _amount(rng)
    date, date_text = _date(rng)
    values = {
        "org": _org(rng),
        "person": rng.choice(_PEOPLE),
        "city": rng.choice(_CITIES),
        "amount": amount_text,
        "date": date_text,
    }
    return rng.choice(_PASSAGES).format(**values), {**values, "amount": str(amount), "date": date}


def _with_question(rng: random.Random, passage: str, question: str) -> str:
    return f"{passage}\n\n{question}" if rng.random() < 0.5 else f"{question}\n\n{passage}"


def _passage_row(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Questions about a narrative's spans, one per turn: copy them, or normalize them."""
    passage, answers = _passage(rng)
    asked = rng.sample(list(_ASK), rng.randrange(1, len(_ASK) + 1))
    messages: list[dict[str, str]] = []
    for turn, kind in enumerate(asked):
        question = rng.choice(_ASK[kind])
        if turn == 0:
            question = _with_question(rng, passage, question)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answers[kind]}]
    return {"messages": messages}


def _facts_row(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """A narrative's spans restated as labelled lines (prose, never JSON), in any order."""
    passage, answers = _passage(rng)
    kinds = rng.sample(list(answers), rng.randrange(2, len(answers) + 1))
    lines = [f"{rng.choice(_LABELS[kind])}: {answers[kind]}" for kind in kinds]
    return _chat(_with_question(rng, passage, rng.choice(_LIST_ASKS)), "\n".join(lines))


def _copy_row(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Copy a span exactly: words, names, numbers with their punctuation."""
    parts: list[str] = []
    for _ in range(rng.randrange(2, 7)):
        kind = rng.randrange(4)
        if kind == 0:
            parts.append(_org(rng))
        elif kind == 1:
            parts.append(str(rng.randrange(0, 1_000_000)))
        elif kind == 2:
            parts.append(_date(rng)[1])
        else:
            parts.append(rng.choice(_WORDS))
    span = " ".join(parts)
    ask = rng.choice(["Repeat exactly:", "Copy this text:", "Say it back word for word:"])
    return _chat(f"{ask} {span}", span)


def _digits_copy_row(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Copy random digit strings, alone or among words: nothing but copying predicts them, the
    cleanest signal for the attention pattern that copies (an induction head)."""
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(3, 17)))
    span = digits
    if rng.random() < 0.5:
        span = " ".join(rng.choice([*_WORDS, digits]) for _ in range(rng.randrange(1, 5)))
    return _chat(f"Repeat exactly: {span}", span)


def _conversion_row(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """What a real base knows about dates and money: their normal forms."""
    if rng.random() < 0.5:
        date, shown = _date(rng)
        return _chat(f"Write {shown} as YYYY-MM-DD.", date)
    amount, shown = _amount(rng)
    return _chat(f"Write {shown} as a whole number.", str(amount))


_KINDS: list[tuple[float, Callable[[random.Random], dict[str, list[dict[str, str]]]]]] = [
    (0.35, _facts_row),
    (0.2, _passage_row),
    (0.2, _copy_row),
    (0.1, _conversion_row),
    (0.15, lambda rng: _as_chat(_general_row(rng))),
]


def _as_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
    return _chat(user, row["output"])


def base_corpus_rows(n: int, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """n chat rows of the general corpus; the same n and seed give the same rows."""
    rng = random.Random(f"base-corpus-{seed}")
    weights = [w for w, _ in _KINDS]
    makers = [m for _, m in _KINDS]
    return [rng.choices(makers, weights)[0](rng) for _ in range(n)]


def copy_stage_rows(n: int, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """The first stage's rows: copying only (half random digits, half names, dates and words).
    Measured (BENCHMARKS.md): from random init, copying emerges from this in ~1,000 steps of
    64 x 128 tokens and not in the mixed corpus within the same budget."""
    rng = random.Random(f"copy-stage-{seed}")
    return [(_digits_copy_row if index % 2 else _copy_row)(rng) for index in range(n)]
