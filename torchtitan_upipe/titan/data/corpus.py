"""Deterministic procedural English-like text corpus.

What is generated
-----------------
Small, *learnable* documents built from templates over tiny vocabularies:

* arithmetic facts in words and digits ("seven plus five is twelve.", "7 + 5 = 12."),
* counting sequences (forwards, backwards, by steps, days, months, letters),
* simple stories (a character, a place, an object, a few events, an ending),
* descriptive facts ("The red ball is under the old table."),
* short question / answer drills ("Q: What comes after nine? A: ten.").

Why
---
TorchTitan's Llama3 ``debugmodel`` must train with no network access (no HF hub,
no C4 download) and nothing generated may be committed to git.  The corpus is
therefore produced on the fly from a seed.  It is both the training text of the
``upipe_debug_text`` dataset and the training corpus of the debug BPE tokenizer.
Because it is highly regular, a tiny model's loss drops quickly and visibly,
which makes it useful for smoke tests and convergence comparisons between
parallelism schemes.

Determinism
-----------
Only ``random.Random`` is used, seeded per document with a *string* seed
(``"upipe-corpus/<seed>/<index>"``, hashed with SHA-512 by CPython, version 2
seeding) and only the integer methods ``randrange``/``random`` whose algorithms
are stable across CPython 3.x.  No dict/set iteration order, hashing of objects,
locale or platform detail feeds into the output, so the same ``(n_docs, seed)``
yields byte-identical text on every machine with Python 3.10+.  Document ``i``
depends only on ``(seed, i)``, so ``generate_documents(n)`` is a prefix of
``generate_documents(m)`` for ``n <= m``.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

__all__ = ["generate_documents", "generate_document", "number_to_words"]

# --------------------------------------------------------------------------- #
# Vocabularies (tuples: fixed order, no set iteration anywhere)
# --------------------------------------------------------------------------- #

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen",
)
_TENS = (
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
    "ninety",
)

_NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris",
    "Jack", "Kate", "Leo", "Maya", "Noah", "Olivia", "Peter", "Quinn", "Rosa",
    "Sam", "Tara", "Umar", "Vera", "Will", "Xena", "Yusuf", "Zoe", "Lily", "Max",
    "Nora", "Oscar", "Ruby", "Theo", "Alice", "Bruno", "Chloe", "Daniel", "Elena",
    "Frank", "Hannah", "Isaac", "Julia", "Karim", "Laura", "Martin", "Nina",
    "Pablo", "Sofia", "Thomas", "Victor", "Wendy", "Amir", "Bella", "Carlos",
    "Diana", "Ethan", "Fiona", "George", "Helen", "Ivan", "Jasmine", "Kevin",
    "Lucas", "Mia", "Nathan", "Priya", "Rachel", "Simon", "Tessa",
)
_ANIMALS = (
    "cat", "dog", "fox", "rabbit", "owl", "bear", "mouse", "horse", "duck",
    "frog", "goat", "lion", "tiger", "sheep", "wolf", "turtle", "pig", "cow",
    "squirrel", "hedgehog", "dragon", "penguin", "monkey", "elephant", "badger",
    "beaver", "camel", "deer", "donkey", "eagle", "falcon", "giraffe", "goose",
    "hamster", "kangaroo", "lizard", "moose", "otter", "panda", "parrot", "raccoon",
    "seal", "snail", "spider", "swan", "whale", "zebra", "crow", "dolphin",
)
_COLORS = (
    "red", "blue", "green", "yellow", "white", "black", "brown", "orange",
    "purple", "pink", "gray", "golden", "silver",
)
_ADJECTIVES = (
    "small", "big", "old", "young", "happy", "sad", "brave", "clever", "quiet",
    "noisy", "kind", "tired", "hungry", "curious", "gentle", "funny", "shy",
    "proud", "lazy", "busy", "little", "tall", "strong", "sleepy", "ancient",
    "bright", "clumsy", "eager", "fierce", "graceful", "honest", "jolly",
    "mighty", "nimble", "patient", "polite", "rusty", "silly", "wise", "wild",
)
_OBJECTS = (
    "ball", "book", "box", "cup", "hat", "key", "lamp", "map", "pen", "ring",
    "shoe", "spoon", "stone", "kite", "drum", "bell", "basket", "candle",
    "ladder", "blanket", "coin", "feather", "letter", "apple", "bottle", "brush",
    "button", "clock", "compass", "envelope", "flute", "glove", "hammer", "jar",
    "kettle", "mirror", "needle", "pillow", "pencil", "rope", "scarf", "shell",
    "sock", "teapot", "ticket", "towel", "umbrella", "violin", "wagon", "whistle",
)
_FURNITURE = (
    "table", "chair", "bed", "shelf", "desk", "door", "window", "sofa",
    "cupboard", "bench", "rug",
)
_PREPOSITIONS = ("on", "under", "next to", "behind", "in front of", "near", "beside")
_PLACES = (
    "forest", "village", "garden", "river", "castle", "farm", "school", "market",
    "beach", "mountain", "library", "kitchen", "park", "harbor", "meadow",
    "cave", "island", "city", "valley", "bakery", "desert", "lake", "museum",
    "station", "hospital", "theater", "orchard", "lighthouse", "bridge", "tower",
    "pond", "jungle", "zoo", "palace", "workshop", "greenhouse", "stadium",
)
_COUNTABLE_FOODS = (
    "apples", "carrots", "pears", "cookies", "plums", "eggs", "muffins", "lemons",
)
_FOODS = (
    "bread", "cheese", "soup", "apples", "carrots", "honey", "rice", "berries",
    "cake", "fish", "pears", "milk", "nuts", "pie", "cookies", "tea", "pasta",
    "beans", "butter", "cherries", "grapes", "lemonade", "noodles", "oranges",
    "pancakes", "peas", "potatoes", "salad", "sandwiches", "tomatoes", "yogurt",
)
_VERBS_PAST = (
    "found", "lost", "carried", "painted", "hid", "dropped", "cleaned", "opened",
    "closed", "gave away", "borrowed", "fixed", "washed", "wrapped", "counted",
    "polished", "repaired", "sold", "bought", "buried", "threw", "caught",
    "decorated", "measured", "weighed", "sketched", "folded", "packed",
)
_MOVES = (
    "walked", "ran", "hopped", "climbed", "swam", "wandered", "raced", "sailed",
    "flew", "crawled", "marched", "skipped", "rode", "drove", "tiptoed", "jogged",
)
_FEELINGS = (
    "happy", "sad", "surprised", "worried", "excited", "calm", "proud", "scared",
    "grateful", "lonely", "cheerful", "nervous", "relieved", "delighted", "puzzled",
)
_WEATHER = ("sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "warm", "cold")
_TIMES = ("morning", "afternoon", "evening", "night")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def _pick(rng: random.Random, seq: Sequence):
    """Uniform choice using only ``randrange`` (stable across Python versions)."""
    return seq[rng.randrange(len(seq))]


def number_to_words(n: int) -> str:
    """English words for ``0 <= n < 1_000_000`` ("one hundred and five")."""
    if n < 0 or n >= 1_000_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
        return head if rest == 0 else head + " and " + number_to_words(rest)
    thousands, rest = divmod(n, 1000)
    head = number_to_words(thousands) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_to_words(rest)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


# --------------------------------------------------------------------------- #
# Paragraph generators: each returns one paragraph (a few sentences)
# --------------------------------------------------------------------------- #

def _arithmetic(rng: random.Random) -> str:
    out = []
    digits = rng.randrange(3) == 0  # one third of the paragraphs use digits
    limit = _pick(rng, (10, 20, 20, 50, 100))
    for _ in range(rng.randrange(4, 9)):
        op = rng.randrange(4)
        if op == 0:
            a, b = rng.randrange(limit), rng.randrange(limit)
            c, sym, word = a + b, "+", "plus"
        elif op == 1:
            a, b = rng.randrange(limit), rng.randrange(limit)
            a, b = max(a, b), min(a, b)
            c, sym, word = a - b, "-", "minus"
        elif op == 2:
            a, b = rng.randrange(13), rng.randrange(13)
            c, sym, word = a * b, "*", "times"
        else:
            b = rng.randrange(1, 13)
            c = rng.randrange(13)
            a, sym, word = b * c, "/", "divided by"
        if digits:
            out.append(f"{a} {sym} {b} = {c}.")
        else:
            out.append(
                f"{_cap(number_to_words(a))} {word} {number_to_words(b)} is "
                f"{number_to_words(c)}."
            )
    return " ".join(out)


def _counting(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # counting up in words
        start, step = rng.randrange(20), _pick(rng, (1, 1, 2, 3, 5, 10))
        n = rng.randrange(5, 13)
        items = [number_to_words(start + i * step) for i in range(n)]
        lead = "Let us count" if step == 1 else f"Let us count by {number_to_words(step)}s"
        return f"{lead}: " + ", ".join(items) + "."
    if kind == 1:  # counting down in digits
        start = rng.randrange(10, 60)
        step = _pick(rng, (1, 2, 5))
        items = [str(start - i * step) for i in range(start // step + 1)][:15]
        return "Counting down: " + ", ".join(items) + "."
    if kind == 2:  # days of the week
        i = rng.randrange(7)
        return (
            f"After {_DAYS[i]} comes {_DAYS[(i + 1) % 7]}. "
            f"Before {_DAYS[i]} comes {_DAYS[(i - 1) % 7]}. "
            "The days of the week are " + ", ".join(_DAYS) + "."
        )
    if kind == 3:  # months
        i = rng.randrange(12)
        return (
            f"{_MONTHS[i]} is month number {number_to_words(i + 1)}. "
            f"The month after {_MONTHS[i]} is {_MONTHS[(i + 1) % 12]}."
        )
    if kind == 4:  # letters
        i = rng.randrange(20)
        n = rng.randrange(4, 7)
        seq = " ".join(_LETTERS[i:i + n])
        return f"The letters go {seq}. After {_LETTERS[i + n - 1]} comes {_LETTERS[(i + n) % 26]}."
    # successor / predecessor drill
    out = []
    for _ in range(rng.randrange(3, 7)):
        k = rng.randrange(1, 200)
        if rng.randrange(2):
            out.append(f"Q: What comes after {number_to_words(k)}? A: {number_to_words(k + 1)}.")
        else:
            out.append(f"Q: What comes before {number_to_words(k)}? A: {number_to_words(k - 1)}.")
    return " ".join(out)


def _facts(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randrange(3, 7)):
        kind = rng.randrange(5)
        if kind == 0:
            color, obj = _pick(rng, _COLORS), _pick(rng, _OBJECTS)
            out.append(
                f"The {color} {obj} is {_pick(rng, _PREPOSITIONS)} the "
                f"{_pick(rng, _ADJECTIVES)} {_pick(rng, _FURNITURE)}."
            )
        elif kind == 1:
            out.append(
                f"{_pick(rng, _NAMES)} likes {_pick(rng, _FOODS)} but not {_pick(rng, _FOODS)}."
            )
        elif kind == 2:
            animal = _pick(rng, _ANIMALS)
            out.append(f"{_cap(_article(animal))} {animal} lives near the {_pick(rng, _PLACES)}.")
        elif kind == 3:
            n = rng.randrange(2, 13)
            out.append(
                f"There are {number_to_words(n)} {_pick(rng, _COLORS)} "
                f"{_plural(_pick(rng, _OBJECTS), n)} in the {_pick(rng, _PLACES)}."
            )
        else:
            out.append(
                f"On {_pick(rng, _DAYS)} the weather was {_pick(rng, _WEATHER)} "
                f"in the {_pick(rng, _PLACES)}."
            )
    return " ".join(out)


def _story(rng: random.Random) -> str:
    name, friend = _pick(rng, _NAMES), _pick(rng, _NAMES)
    animal, adj = _pick(rng, _ANIMALS), _pick(rng, _ADJECTIVES)
    place, other = _pick(rng, _PLACES), _pick(rng, _PLACES)
    color, obj = _pick(rng, _COLORS), _pick(rng, _OBJECTS)
    n_friends = rng.randrange(1, 6)
    out = [
        f"Once upon a time, there was {_article(adj)} {adj} {animal} named {name}.",
        f"{name} lived in a {place} with {number_to_words(n_friends)} "
        f"{_plural('friend', n_friends)}.",
    ]
    for _ in range(rng.randrange(2, 6)):
        kind = rng.randrange(5)
        if kind == 0:
            out.append(
                f"One {_pick(rng, _TIMES)}, {name} {_pick(rng, _VERBS_PAST)} "
                f"{_article(color)} {color} {obj}."
            )
        elif kind == 1:
            out.append(f"{name} {_pick(rng, _MOVES)} to the {other} to see {friend}.")
        elif kind == 2:
            out.append(f"{friend} said, \"Hello, {name}! Do you want some {_pick(rng, _FOODS)}?\"")
        elif kind == 3:
            out.append(
                f"The day was {_pick(rng, _WEATHER)}, and {name} felt {_pick(rng, _FEELINGS)}."
            )
        else:
            k = rng.randrange(3, 10)
            out.append(
                f"{name} had {number_to_words(k)} {_pick(rng, _COUNTABLE_FOODS)}, ate one, and "
                f"had {number_to_words(k - 1)} left."
            )
    out.append(f"In the end, {name} and {friend} were {_pick(rng, _FEELINGS)}. The end.")
    return " ".join(out)


def _numbers(rng: random.Random) -> str:
    """Multi-digit numbers: times, years, prices, measurements, long sums."""
    out = []
    for _ in range(rng.randrange(3, 7)):
        kind = rng.randrange(6)
        if kind == 0:
            h, m = rng.randrange(1, 13), 5 * rng.randrange(12)
            dh, dm = rng.randrange(1, 4), 5 * rng.randrange(12)
            m2 = m + dm
            h2 = (h + dh + m2 // 60 - 1) % 12 + 1
            out.append(
                f"The {_pick(rng, ('train', 'bus', 'boat', 'plane'))} leaves the "
                f"{_pick(rng, _PLACES)} at {h}:{m:02d} and arrives at {h2}:{m2 % 60:02d}."
            )
        elif kind == 1:
            year, adj = rng.randrange(1800, 2100), _pick(rng, _ADJECTIVES)
            out.append(
                f"In the year {year}, {_pick(rng, _NAMES)} built {_article(adj)} {adj} "
                f"house in the {_pick(rng, _PLACES)}."
            )
        elif kind == 2:
            n, price = rng.randrange(2, 20), rng.randrange(1, 100)
            food = _pick(rng, _COUNTABLE_FOODS)
            out.append(
                f"{n} {food} cost {n * price} coins, so one costs {price} coins."
            )
        elif kind == 3:
            a, b = rng.randrange(100, 10000), rng.randrange(100, 10000)
            out.append(f"{a} + {b} = {a + b}.")
        elif kind == 4:
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
            out.append(f"{a} * {b} = {a * b}.")
        else:
            d = rng.randrange(100, 5000)
            out.append(
                f"The path from the {_pick(rng, _PLACES)} to the {_pick(rng, _PLACES)} "
                f"is {d} steps long, and {_pick(rng, _NAMES)} walked {d // 2} of them."
            )
    return " ".join(out)


_PARAGRAPHS: tuple[Callable[[random.Random], str], ...] = (
    _arithmetic, _counting, _facts, _story, _numbers,
)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #

def generate_document(index: int, seed: int = 0) -> str:
    """Document ``index`` of the corpus for ``seed`` (between ~300 and ~2000 chars).

    A document has a dominant theme (arithmetic, counting, facts or stories) with
    occasional paragraphs of other kinds, and is grown paragraph by paragraph
    until it reaches a randomly drawn target length.
    """
    rng = random.Random(f"upipe-corpus/{seed}/{index}")
    target = rng.randrange(300, 1800)
    theme = rng.randrange(len(_PARAGRAPHS))
    paragraphs: list[str] = []
    length = 0
    while length < target:
        kind = theme if rng.randrange(4) else rng.randrange(len(_PARAGRAPHS))
        para = _PARAGRAPHS[kind](rng)
        paragraphs.append(para)
        length += len(para) + 2
    return "\n\n".join(paragraphs)


def generate_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Return ``n_docs`` deterministic English-like documents for ``seed``.

    Same ``(n_docs, seed)`` -> identical list on every machine (Python 3.10+);
    the result for ``n`` is a prefix of the result for any larger ``n``.
    """
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    return [generate_document(i, seed) for i in range(n_docs)]
