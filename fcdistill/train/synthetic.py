"""A tiny seeded tool-calling set, rendered through the wire format, for smoke runs and tests.

Three tools with short schemas keep examples near 270 SmolLM2 tokens, so a CPU run of a few minutes
can teach the FC token and argument copying. Train and held-out splits use disjoint cities,
currencies and numbers, so a held-out query is answered by copying, not by recall; half the
training cities are made-up names, which teaches copying rather than recalling known places. Real
training data comes from `fcd data export --format trl`; this set has the same shape (it goes
through the same `ChatFormat.render_prompt` / `render_target`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcdistill.chat_format import ChatFormat
from fcdistill.tools import ToolCall, ToolSpec, normalize_tools

TOOLS: list[ToolSpec] = normalize_tools([
    {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies.",
     "parameters": {"type": "object", "properties": {
         "amount": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
         "required": ["amount", "source", "target"]}},
    {"name": "set_timer", "description": "Start a countdown timer.",
     "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]}},
])

_CITIES_TRAIN = ["Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Oslo", "Cairo", "Lima", "Seoul", "Dublin",
                 "Vienna", "Prague", "Athens", "Warsaw", "Nairobi", "Boston", "Denver", "Sydney", "Toronto",
                 "Mumbai", "Bangkok", "Helsinki", "Lisbon", "Chicago", "Budapest", "Hanoi", "Jakarta", "Lagos",
                 "Bogota", "Santiago", "Montreal", "Seattle", "Phoenix", "Glasgow", "Munich", "Hamburg", "Milan",
                 "Naples", "Kyoto", "Busan", "Taipei", "Dubai", "Doha", "Riyadh", "Tehran", "Karachi", "Dhaka",
                 "Accra", "Addis Ababa", "Casablanca", "Reykjavik", "Tallinn", "Riga", "Vilnius", "Sofia",
                 "Belgrade", "Zagreb", "Krakow", "Gdansk", "Geneva", "Antwerp", "Rotterdam", "Marseille", "Nice",
                 "Valencia", "Seville", "Austin", "Miami", "Atlanta", "Dallas", "Houston", "Perth", "Auckland",
                 "Wellington", "Cape Town", "Durban", "Kampala", "Lusaka", "Harare", "Montevideo", "Asuncion"]
_CITIES_HELDOUT = ["Zurich", "Havana", "Manila", "Dakar", "Quito", "Osaka", "Porto", "Tunis", "Ottawa", "Bergen",
                   "Leipzig", "Malaga"]
_CURRENCIES_TRAIN = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "CNY", "MXN", "NOK", "DKK", "PLN", "KRW", "NZD",
                     "SGD", "HKD", "ZAR", "CZK", "HUF", "ILS", "EGP"]
_CURRENCIES_HELDOUT = ["AUD", "SEK", "INR", "BRL", "THB", "TRY"]

_SYLLABLES = ["ka", "lo", "mir", "ten", "va", "dor", "bri", "sa", "nu", "tor", "el", "gan", "pi", "rus", "ho",
              "zel", "mar", "quin", "ost", "ul", "fen", "dra", "bo", "wick"]


def _made_up_city(rng: random.Random) -> str:
    """A pronounceable name no model has memorised: training on these teaches copying, not recall."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


_WEATHER = ["What's the weather in {city}?", "How is the weather in {city} right now?",
            "Weather for {city}, please.", "Is it raining in {city}?"]
_WEATHER_UNIT = ["What's the weather in {city} in {unit}?", "Give me the {city} temperature in {unit}."]
_CURRENCY = ["Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?",
             "Change {amount} {source} into {target}."]
_TIMER = ["Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.",
          "Remind me in {minutes} minutes."]
_CHAT = [("Hello!", "Hello! How can I help you today?"),
         ("Thanks a lot.", "You're welcome!"),
         ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
         ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
         ("What is 2 plus 2?", "2 plus 2 is 4.")]


@dataclass(frozen=True)
class Example:
    """One query, its tools, and the expected answer (calls, or text when no tool fits)."""

    query: str
    calls: tuple[ToolCall, ...]
    content: str | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.query}]


def _city(rng: random.Random, held_out: bool) -> str:
    if held_out:
        return rng.choice(_CITIES_HELDOUT)
    return _made_up_city(rng) if rng.random() < 0.5 else rng.choice(_CITIES_TRAIN)


def _call_example(rng: random.Random, held_out: bool) -> Example:
    currencies = _CURRENCIES_HELDOUT if held_out else _CURRENCIES_TRAIN
    kind = rng.choice(["weather", "weather_unit", "currency", "timer"])
    if kind == "weather":
        city = _city(rng, held_out)
        return Example(rng.choice(_WEATHER).format(city=city), (ToolCall(name="get_weather", arguments={"city": city}),))
    if kind == "weather_unit":
        city, unit = _city(rng, held_out), rng.choice(["celsius", "fahrenheit"])
        return Example(rng.choice(_WEATHER_UNIT).format(city=city, unit=unit),
                       (ToolCall(name="get_weather", arguments={"city": city, "unit": unit}),))
    if kind == "currency":
        source, target = rng.sample(currencies, 2)
        amount = rng.randrange(110, 990, 10) if held_out else rng.randrange(5, 100)
        return Example(rng.choice(_CURRENCY).format(amount=amount, source=source, target=target),
                       (ToolCall(name="convert_currency", arguments={"amount": amount, "source": source,
                                                                     "target": target}),))
    minutes = rng.randrange(61, 99) if held_out else rng.randrange(1, 60)
    return Example(rng.choice(_TIMER).format(minutes=minutes), (ToolCall(name="set_timer", arguments={"minutes": minutes}),))


def examples(n: int, *, seed: int = 0, held_out: bool = False, chat_share: float = 0.15) -> list[Example]:
    """`n` seeded examples; about `chat_share` of the training ones are plain answers (no tool fits)."""
    rng = random.Random(seed + (1_000_003 if held_out else 0))
    out = []
    for _ in range(n):
        if not held_out and rng.random() < chat_share:
            q, a = rng.choice(_CHAT)
            out.append(Example(q, (), a))
        else:
            out.append(_call_example(rng, held_out))
    return out


def trl_records(fmt: ChatFormat, items: list[Example]) -> list[dict[str, str]]:
    """Prompt-completion records exactly as `fcd data export --format trl` writes them."""
    return [{"id": f"synthetic-{i}", "prompt": fmt.render_prompt(e.messages, TOOLS),
             "completion": fmt.render_target(e.content, e.calls)} for i, e in enumerate(items)]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    return path
