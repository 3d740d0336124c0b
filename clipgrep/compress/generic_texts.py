"""A generic caption and query corpus for text stage 1, generated from templates.

Distilling a text tower needs texts, and a user distilling on their own photo
library has none. These are the kinds of things people search their photos for
(objects, animals, people, scenes, places, colours, counts, times of day, weather,
styles), put together by a fixed set of templates and sampled deterministically,
so the corpus is the same on every machine, carries no third-party text (nothing to
license) and costs nothing to ship. ``--texts builtin:generic`` selects it.

Example::

    texts = generic_texts()        # 30,000 distinct lines
    texts[:2]                      # ['a photo of two red bicycles on a beach', ...]
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

BUILTIN_GENERIC = "builtin:generic"
DEFAULT_COUNT = 30_000

_OBJECTS = (
    ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("cow", "cows"),
    ("sheep", "sheep"), ("duck", "ducks"), ("fish", "fish"), ("butterfly", "butterflies"), ("bear", "bears"),
    ("person", "people"), ("child", "children"), ("woman", "women"), ("man", "men"), ("baby", "babies"),
    ("car", "cars"), ("bicycle", "bicycles"), ("motorcycle", "motorcycles"), ("bus", "buses"),
    ("train", "trains"), ("boat", "boats"), ("airplane", "airplanes"), ("truck", "trucks"),
    ("house", "houses"), ("bridge", "bridges"), ("tower", "towers"), ("church", "churches"),
    ("tree", "trees"), ("flower", "flowers"), ("mountain", "mountains"), ("lake", "lakes"),
    ("chair", "chairs"), ("table", "tables"), ("sofa", "sofas"), ("bed", "beds"), ("lamp", "lamps"),
    ("book", "books"), ("cup", "cups"), ("bottle", "bottles"), ("plate of food", "plates of food"),
    ("cake", "cakes"), ("pizza", "pizzas"), ("apple", "apples"), ("banana", "bananas"),
    ("umbrella", "umbrellas"), ("kite", "kites"), ("ball", "balls"), ("guitar", "guitars"),
    ("laptop", "laptops"), ("phone", "phones"), ("clock", "clocks"), ("window", "windows"),
    ("door", "doors"), ("sign", "signs"), ("tent", "tents"), ("snowman", "snowmen"),
)
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown", "grey",
            "golden")
_COUNTS = (("a", 1), ("one", 1), ("two", 2), ("three", 3), ("four", 4), ("several", 5), ("many", 6))
_PLACES = ("on a beach", "in a park", "in the snow", "on a street", "in a kitchen", "in a living room",
           "in a forest", "by a lake", "in the mountains", "in a city", "on a farm", "in a garden",
           "at a wedding", "at a birthday party", "in an office", "at a train station", "in a museum",
           "on a boat", "in the desert", "under a bridge", "at the airport", "in a classroom",
           "at a market", "on a bed", "on a table", "in a field", "at a concert", "in the rain")
_TIMES = ("at night", "at sunset", "at sunrise", "in the morning", "in winter", "in summer", "in autumn",
          "on a foggy day", "on a sunny day", "under a cloudy sky")
_STYLES = ("a photo of", "a close-up photo of", "a blurry photo of", "a black and white photo of",
           "an old photo of", "a selfie with", "a drawing of", "a screenshot showing", "a picture of",
           "a wide shot of")
_ACTIONS = ("running", "sleeping", "playing", "sitting", "standing", "eating", "jumping", "swimming",
            "walking", "smiling")


def _noun(count_word: str, count: int, singular: str, plural: str) -> str:
    return f"{count_word} {singular if count == 1 else plural}"


class _Draws:
    """Choices from a hash of (seed, counter): the same on every machine and Python version,
    which ``random.Random.choice`` does not promise."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.counter = 0

    def below(self, n: int) -> int:
        self.counter += 1
        digest = hashlib.blake2b(f"{self.seed}:{self.counter}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % n

    def choice(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]


def _caption(rng: _Draws) -> str:
    """One caption from one randomly chosen template."""
    singular, plural = rng.choice(_OBJECTS)
    count_word, count = rng.choice(_COUNTS)
    colour, place, time, style = rng.choice(_COLOURS), rng.choice(_PLACES), rng.choice(_TIMES), rng.choice(_STYLES)
    thing = _noun(count_word, count, f"{colour} {singular}", f"{colour} {plural}")
    kind = rng.below(8)
    if kind == 0:
        return f"{style} {thing} {place}"
    if kind == 1:
        return f"{thing} {place} {time}"
    if kind == 2:
        return f"{_noun(count_word, count, singular, plural)} {rng.choice(_ACTIONS)} {place}"
    if kind == 3:
        other = rng.choice(_OBJECTS)[0]
        return f"{thing} next to a {rng.choice(_COLOURS)} {other}"
    if kind == 4:
        return f"{singular} {place}"  # short, query-like
    if kind == 5:
        return f"{colour} {plural}"
    if kind == 6:
        return f"{style} {place.split(' ', 1)[1]} {time}"
    return f"{style} {_noun(count_word, count, singular, plural)} {time}"


def generic_texts(count: int = DEFAULT_COUNT, seed: int = 0) -> list[str]:
    """``count`` distinct generated captions, the same list for the same (count, seed) everywhere."""
    draws = _Draws(seed)
    seen: dict[str, None] = {}
    for _ in range(count * 20):  # the template space holds millions; duplicates are rare
        if len(seen) >= count:
            break
        seen.setdefault(_caption(draws), None)
    return list(seen)
