"""The tiny templated "world" behind the shipped demo corpus.

Every question in :mod:`deeptalk.data.demo_corpus` (spoken and text-only) is
generated from the fixed tables in this module, so the answer to any corpus
question can be recomputed here.  That makes the corpus self-checking (see
``tests/test_demo_corpus.py``) and lets demos measure whether a model "knows"
the world from text, from speech, or both.

Design constraints:

* vocabulary is small, lowercase, no digits (numbers are spelled out and stay
  within ``zero`` .. ``twenty``),
* every answer is one short word,
* facts are simple or made up, so nothing depends on real-world knowledge.

This module is pure Python (no audio, no third-party imports) and is used both
by ``scripts/make_demo_corpus.py`` (to generate the corpus) and by the tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

NUMBER_WORDS: Tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)
MAX_NUMBER = len(NUMBER_WORDS) - 1  # twenty
WORD_TO_NUMBER: Dict[str, int] = {w: i for i, w in enumerate(NUMBER_WORDS)}

# --- entity tables ---------------------------------------------------------
# Objects and their colour.
OBJECT_COLORS: Dict[str, str] = {
    "apple": "red",
    "banana": "yellow",
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "carrot": "orange",
    "plum": "purple",
    "lemon": "yellow",
    "cherry": "red",
}
COLORS: Tuple[str, ...] = tuple(sorted(set(OBJECT_COLORS.values())))

# People: city, pet, age (ages are distinct so "older than" is well defined).
PEOPLE: Dict[str, Dict[str, object]] = {
    "anna": {"city": "paris", "pet": "cat", "age": 9},
    "ben": {"city": "london", "pet": "dog", "age": 12},
    "carl": {"city": "rome", "pet": "fish", "age": 7},
    "dora": {"city": "madrid", "pet": "bird", "age": 15},
    "emma": {"city": "berlin", "pet": "horse", "age": 11},
    "finn": {"city": "oslo", "pet": "rabbit", "age": 8},
    "gina": {"city": "cairo", "pet": "dog", "age": 14},
    "hugo": {"city": "lima", "pet": "cat", "age": 10},
    "iris": {"city": "tokyo", "pet": "fish", "age": 13},
    "jack": {"city": "dublin", "pet": "horse", "age": 6},
}
CITIES: Tuple[str, ...] = tuple(p["city"] for p in PEOPLE.values())  # one person per city
PETS: Tuple[str, ...] = tuple(sorted({p["pet"] for p in PEOPLE.values()}))

# Animals: the sound they make and how many legs they have.
ANIMAL_SOUNDS: Dict[str, str] = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "owl": "hoot",
    "lion": "roar",
}
ANIMAL_LEGS: Dict[str, int] = {
    "cow": 4,
    "dog": 4,
    "duck": 2,
    "spider": 8,
    "ant": 6,
    "snake": 0,
    "bird": 2,
    "horse": 4,
}


def num(n: int) -> str:
    """Spell out ``0 <= n <= 20``."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number out of the world's range: {n}")
    return NUMBER_WORDS[n]


@dataclass(frozen=True)
class QAItem:
    """One question of the world with its (single-word) answer."""

    question: str
    answer: str
    category: str  # "arithmetic" | "fact" | "yes_no"
    template: str  # fine-grained template name, e.g. "plus", "color_of"

    def to_dict(self) -> Dict[str, str]:
        return {"question": self.question, "answer": self.answer,
                "category": self.category, "template": self.template}


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def all_questions(seed: int = 0) -> List[QAItem]:
    """Enumerate every question of the world (deterministic for a given seed).

    The seed only picks which *false* candidates are used for the fact yes/no
    questions (so those stay balanced between ``yes`` and ``no``).
    """
    rng = random.Random(seed)
    items: List[QAItem] = []
    add = lambda q, a, c, t: items.append(QAItem(q, a, c, t))  # noqa: E731

    # --- arithmetic ----------------------------------------------------
    # "what is" covers the full zero..twenty range, "how much is" only the
    # single-digit operands (a second surface form for paraphrase tests).
    for a in range(MAX_NUMBER + 1):
        for b in range(11):
            if a + b <= MAX_NUMBER:
                add(f"what is {num(a)} plus {num(b)}", num(a + b), "arithmetic", "plus")
                if a <= 10:
                    add(f"how much is {num(a)} plus {num(b)}", num(a + b), "arithmetic", "plus_how_much")
            if b <= a:
                add(f"what is {num(a)} minus {num(b)}", num(a - b), "arithmetic", "minus")
                if a <= 10:
                    add(f"how much is {num(a)} minus {num(b)}", num(a - b), "arithmetic", "minus_how_much")
    for a in range(1, 6):
        for b in range(1, 6):
            if a * b <= MAX_NUMBER:
                add(f"what is {num(a)} times {num(b)}", num(a * b), "arithmetic", "times")
    for n in range(MAX_NUMBER):
        add(f"what number comes after {num(n)}", num(n + 1), "arithmetic", "after")
        add(f"what number comes before {num(n + 1)}", num(n), "arithmetic", "before")

    # --- number comparisons (yes/no) -----------------------------------
    for a in range(11):
        for b in range(11):
            if a != b:
                add(f"is {num(a)} bigger than {num(b)}", _yes_no(a > b), "yes_no", "bigger")
                add(f"is {num(a)} smaller than {num(b)}", _yes_no(a < b), "yes_no", "smaller")

    # --- object colours --------------------------------------------------
    for obj, color in OBJECT_COLORS.items():
        add(f"what color is the {obj}", color, "fact", "color")
        add(f"what is the color of the {obj}", color, "fact", "color_of")
        add(f"is the {obj} {color}", "yes", "yes_no", "is_color")
        for wrong in rng.sample([c for c in COLORS if c != color], 3):
            add(f"is the {obj} {wrong}", "no", "yes_no", "is_color")

    # --- people ----------------------------------------------------------
    names = list(PEOPLE)
    for name, info in PEOPLE.items():
        city, pet, age = str(info["city"]), str(info["pet"]), int(info["age"])  # type: ignore[arg-type]
        add(f"where does {name} live", city, "fact", "lives")
        add(f"in which city does {name} live", city, "fact", "lives_city")
        add(f"who lives in {city}", name, "fact", "who_lives")
        add(f"does {name} live in {city}", "yes", "yes_no", "lives_in")
        for wrong in rng.sample([c for c in CITIES if c != city], 2):
            add(f"does {name} live in {wrong}", "no", "yes_no", "lives_in")
        add(f"what pet does {name} have", pet, "fact", "pet")
        add(f"which animal does {name} have", pet, "fact", "pet_animal")
        add(f"does {name} have a {pet}", "yes", "yes_no", "has_pet")
        for wrong in rng.sample([p for p in PETS if p != pet], 2):
            add(f"does {name} have a {wrong}", "no", "yes_no", "has_pet")
        add(f"how old is {name}", num(age), "fact", "age")
        add(f"what is the age of {name}", num(age), "fact", "age_of")
        for other in names:
            if other != name:
                other_age = int(PEOPLE[other]["age"])  # type: ignore[arg-type]
                add(f"is {name} older than {other}", _yes_no(age > other_age), "yes_no", "older")

    # --- animals ---------------------------------------------------------
    for animal, sound in ANIMAL_SOUNDS.items():
        add(f"what does the {animal} say", sound, "fact", "sound")
        add(f"what sound does the {animal} make", sound, "fact", "sound_make")
        add(f"which animal says {sound}", animal, "fact", "who_says")
        add(f"does the {animal} say {sound}", "yes", "yes_no", "says")
        wrong = rng.choice([s for a, s in ANIMAL_SOUNDS.items() if a != animal])
        add(f"does the {animal} say {wrong}", "no", "yes_no", "says")
    for animal, legs in ANIMAL_LEGS.items():
        add(f"how many legs does a {animal} have", num(legs), "fact", "legs")
        add(f"does a {animal} have {num(legs)} legs", "yes", "yes_no", "has_legs")
        wrong_legs = rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs])
        add(f"does a {animal} have {num(wrong_legs)} legs", "no", "yes_no", "has_legs")

    questions = [it.question for it in items]
    assert len(questions) == len(set(questions)), "duplicate question text in the world"
    return items


def all_statements() -> List[Tuple[str, str]]:
    """Plain declarative sentences about the world, as ``(text, template)``.

    Used as extra ASR material (utterances that are not questions).
    """
    out: List[Tuple[str, str]] = []
    for obj, color in OBJECT_COLORS.items():
        out.append((f"the {obj} is {color}", "color"))
    for name, info in PEOPLE.items():
        out.append((f"{name} lives in {info['city']}", "lives"))
        out.append((f"{name} has a {info['pet']}", "pet"))
        out.append((f"{name} is {num(int(info['age']))} years old", "age"))  # type: ignore[arg-type]
    for animal, sound in ANIMAL_SOUNDS.items():
        out.append((f"the {animal} says {sound}", "sound"))
    for animal, legs in ANIMAL_LEGS.items():
        out.append((f"a {animal} has {num(legs)} legs", "legs"))
    for a in range(11):
        for b in range(11):
            if a + b <= MAX_NUMBER:
                out.append((f"{num(a)} plus {num(b)} is {num(a + b)}", "plus"))
            if b <= a:
                out.append((f"{num(a)} minus {num(b)} is {num(a - b)}", "minus"))
            if a > b:
                out.append((f"{num(a)} is bigger than {num(b)}", "bigger"))
    texts = [t for t, _ in out]
    assert len(texts) == len(set(texts))
    return out


def answer_lookup(seed: int = 0) -> Dict[str, str]:
    """``{question_text: answer_text}`` for every question of the world."""
    return {it.question: it.answer for it in all_questions(seed)}


def solve(question: str) -> Optional[str]:
    """Answer a world question by rule (independent of the generated tables).

    Returns ``None`` when the question does not match any known pattern.
    Handy for scoring free-form model output in demos.
    """
    w = question.strip().lower().rstrip("?").split()
    n = WORD_TO_NUMBER.get
    try:
        if w[:2] == ["how", "much"]:
            w = w[1:]  # "how much is x plus y" -> "much is x plus y" (same positions as "what is")
            w[0] = "what"
        if w[:2] == ["what", "is"] and len(w) == 5 and w[3] in ("plus", "minus", "times"):
            a, b = n(w[2]), n(w[4])
            if a is None or b is None:
                return None
            r = {"plus": a + b, "minus": a - b, "times": a * b}[w[3]]
            return num(r) if 0 <= r <= MAX_NUMBER else None
        if w[:3] == ["what", "number", "comes"] and len(w) == 5:
            a = n(w[4])
            if a is None:
                return None
            r = a + 1 if w[3] == "after" else a - 1
            return num(r) if 0 <= r <= MAX_NUMBER else None
        if w[0] == "is" and len(w) == 5 and w[2] in ("bigger", "smaller") and w[3] == "than":
            a, b = n(w[1]), n(w[4])
            if a is not None and b is not None:
                return _yes_no(a > b if w[2] == "bigger" else a < b)
        if w[0] == "is" and len(w) == 5 and w[2] == "older" and w[1] in PEOPLE and w[4] in PEOPLE:
            return _yes_no(int(PEOPLE[w[1]]["age"]) > int(PEOPLE[w[4]]["age"]))  # type: ignore[arg-type]
        if w[:3] == ["what", "color", "is"] or w[:5] == ["what", "is", "the", "color", "of"]:
            return OBJECT_COLORS.get(w[-1])
        if w[:2] == ["is", "the"] and len(w) == 4 and w[2] in OBJECT_COLORS:
            return _yes_no(OBJECT_COLORS[w[2]] == w[3])
        if w[0] == "where" or w[:3] == ["in", "which", "city"]:
            name = w[-2]
            return str(PEOPLE[name]["city"]) if name in PEOPLE else None
        if w[:3] == ["who", "lives", "in"]:
            for name, info in PEOPLE.items():
                if info["city"] == w[3]:
                    return name
            return None
        if w[0] == "does" and w[2:4] == ["live", "in"] and w[1] in PEOPLE:
            return _yes_no(PEOPLE[w[1]]["city"] == w[4])
        if w[0] == "does" and w[2:4] == ["have", "a"] and w[1] in PEOPLE:
            return _yes_no(PEOPLE[w[1]]["pet"] == w[4])
        if w[:2] in (["what", "pet"], ["which", "animal"]) and w[-1] == "have":
            name = w[-2]
            return str(PEOPLE[name]["pet"]) if name in PEOPLE else None
        if (w[:3] == ["how", "old", "is"] or w[:4] == ["what", "is", "the", "age"]) and w[-1] in PEOPLE:
            return num(int(PEOPLE[w[-1]]["age"]))  # type: ignore[arg-type]
        if w[:2] == ["what", "does"] and w[-1] == "say" or w[:3] == ["what", "sound", "does"]:
            animal = w[3] if w[1] == "does" else w[4]
            return ANIMAL_SOUNDS.get(animal)
        if w[:3] == ["which", "animal", "says"]:
            for animal, sound in ANIMAL_SOUNDS.items():
                if sound == w[3]:
                    return animal
            return None
        if w[:2] == ["does", "the"] and len(w) == 5 and w[3] == "say" and w[2] in ANIMAL_SOUNDS:
            return _yes_no(ANIMAL_SOUNDS[w[2]] == w[4])
        if w[:2] == ["does", "a"] and len(w) == 6 and w[5] == "legs" and w[2] in ANIMAL_LEGS:
            return _yes_no(n(w[4]) == ANIMAL_LEGS[w[2]])
        if w[:4] == ["how", "many", "legs", "does"] and w[5] in ANIMAL_LEGS:
            return num(ANIMAL_LEGS[w[5]])
    except (IndexError, KeyError):
        return None
    return None


def vocabulary(seed: int = 0) -> List[str]:
    """Sorted list of every word used in questions, answers and statements."""
    words = set()
    for it in all_questions(seed):
        words.update(it.question.split())
        words.update(it.answer.split())
    for text, _ in all_statements():
        words.update(text.split())
    return sorted(words)


def world_tables() -> Dict[str, object]:
    """The raw fact tables (JSON-serialisable), e.g. for README / metadata."""
    return {
        "object_colors": dict(OBJECT_COLORS),
        "people": {k: dict(v) for k, v in PEOPLE.items()},
        "animal_sounds": dict(ANIMAL_SOUNDS),
        "animal_legs": dict(ANIMAL_LEGS),
        "numbers": list(NUMBER_WORDS),
    }


# --- things and their kinds: a text-only task family --------------------------------------------
# Not part of the shipped corpus (nothing here is spoken): words that never occur in the corpus, so a
# model's knowledge of them can only come from text. Six kinds of eight things each.
THING_KINDS: Dict[str, Tuple[str, ...]] = {
    "tool": ("hammer", "saw", "drill", "axe", "spade", "rake", "wrench", "chisel"),
    "vehicle": ("car", "bus", "train", "boat", "bike", "plane", "truck", "ship"),
    "instrument": ("drum", "flute", "piano", "harp", "violin", "guitar", "trumpet", "bell"),
    "garment": ("hat", "coat", "shoe", "sock", "shirt", "scarf", "glove", "dress"),
    "furniture": ("chair", "table", "bed", "sofa", "desk", "shelf", "stool", "bench"),
    "drink": ("tea", "milk", "juice", "water", "coffee", "soda", "wine", "cocoa"),
}
KIND_OF_THING: Dict[str, str] = {thing: kind for kind, things in THING_KINDS.items() for thing in things}
KIND_TEMPLATES: Tuple[str, ...] = ("which_is", "which_is_not", "how_many")
"""Templates of :func:`kind_questions`: pick the one thing of a kind, the odd one out, count a kind."""


def _one(kind: str) -> str:
    return {"instrument": "an instrument", "furniture": "a piece of furniture"}.get(kind, f"a {kind}")


def _plural(kind: str) -> str:
    return "pieces of furniture" if kind == "furniture" else kind + "s"


def kind_question(rng: random.Random, template: str) -> QAItem:
    """One random question about things and their kinds (see :func:`kind_questions`)."""
    kinds = sorted(THING_KINDS)
    size = rng.randint(3, 5)
    if template == "which_is":  # one thing of the asked kind among things of other kinds
        kind, *others = rng.sample(kinds, size)
        things = [rng.choice(THING_KINDS[kind])] + [rng.choice(THING_KINDS[k]) for k in others]
        rng.shuffle(things)
        answer = next(t for t in things if KIND_OF_THING[t] == kind)
        question = f"which one is {_one(kind)} in [{','.join(things)}]"
    elif template == "which_is_not":  # the odd one out: every thing but one is of the asked kind
        kind, odd_kind = rng.sample(kinds, 2)
        things = rng.sample(THING_KINDS[kind], size - 1) + [rng.choice(THING_KINDS[odd_kind])]
        rng.shuffle(things)
        answer = next(t for t in things if KIND_OF_THING[t] == odd_kind)
        question = f"which one is not {_one(kind)} in [{','.join(things)}]"
    elif template == "how_many":
        kind = rng.choice(kinds)
        count = rng.randint(0, min(size, 4))
        things = rng.sample(THING_KINDS[kind], count) + [
            rng.choice(THING_KINDS[k]) for k in rng.choices([k for k in kinds if k != kind], k=size - count)]
        rng.shuffle(things)
        answer = num(count)
        question = f"how many {_plural(kind)} are in [{','.join(things)}]"
    else:
        raise ValueError(f"unknown kind template {template!r}; choose from {KIND_TEMPLATES}")
    return QAItem(question, answer, "kinds", template)


def kind_questions(count: int, seed: int = 0, templates: Sequence[str] = KIND_TEMPLATES,
                   exclude: Iterable[str] = ()) -> List[QAItem]:
    """`count` distinct random questions about things and their kinds, in equal shares per template.

    Lists are written ``[a,b,c]`` (no spaces) so that a listed thing and the same word as an answer are
    the same token for a byte-level BPE. Questions in `exclude` (e.g. a test split) are never drawn, so
    splits built with different seeds and `exclude` are disjoint. Deterministic for a given seed.
    """
    templates = tuple(templates)
    if count < 0 or not templates:
        raise ValueError(f"kind_questions needs count >= 0 and at least one template, got {count}, {templates}")
    rng = random.Random(seed)
    seen = set(exclude)
    items: List[QAItem] = []
    attempts = 0
    while len(items) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"could not draw {count} distinct kind questions (the templates' space is too small)")
        item = kind_question(rng, templates[len(items) % len(templates)])
        if item.question not in seen:
            seen.add(item.question)
            items.append(item)
    return items


def kind_facts() -> List[Tuple[str, str]]:
    """``(question, answer)`` for "what kind of thing is a X": the facts behind :func:`kind_questions`."""
    return [(f"what kind of thing is {'an' if thing[0] in 'aeiou' else 'a'} {thing}", kind)
            for thing, kind in KIND_OF_THING.items()]
