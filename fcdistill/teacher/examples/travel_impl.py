"""Executable implementations of the example travel tools, for `fcd synth --exec-module example`.

Deterministic fakes with real preconditions: a call that passes the schema can still fail here
(same origin and destination, a date in the past, converting a currency to itself), which is what
the execution stage is for.
"""

import datetime as _dt

_RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88, "CAD": 1.36}
_EARLIEST = _dt.date(2024, 1, 1)


def _date(text):
    day = _dt.date.fromisoformat(text)
    if day < _EARLIEST:
        raise ValueError(f"date {text} is in the past")
    return day


def search_flights(origin, destination, date, passengers=1, cabin="economy", max_stops=None):
    if origin == destination:
        raise ValueError("origin and destination are the same airport")
    _date(date)
    stops = 0 if max_stops is None else max_stops
    return {"flights": [{"flight": f"{origin}{destination}{i}", "stops": min(i, stops), "cabin": cabin,
                         "seats": passengers, "price_usd": 120 + 80 * i} for i in range(2)]}


def book_hotel(city, check_in, nights, guests, room_type="double", breakfast=False):
    _date(check_in)
    people = guests["adults"] + guests.get("children", 0)
    if room_type == "single" and people > 1:
        raise ValueError(f"a single room cannot hold {people} guests")
    return {"confirmation": f"H-{city[:3].upper()}-{nights}-{people}", "room_type": room_type,
            "breakfast": breakfast}


def convert_currency(amount, from_currency, to_currency):
    if from_currency == to_currency:
        raise ValueError("nothing to convert: the currencies are the same")
    return {"amount": round(amount / _RATES[from_currency] * _RATES[to_currency], 2), "currency": to_currency}


def get_weather_forecast(city, days=3, units="metric"):
    base = 18 if units == "metric" else 64
    return {"city": city, "days": [{"day": i + 1, "high": base + i % 3, "sky": "clear"} for i in range(days)]}


def plan_itinerary(title, stops, start_date=None):
    if start_date is not None:
        _date(start_date)
    cities = [s["city"] for s in stops]
    if any(a == b for a, b in zip(cities, cities[1:])):
        raise ValueError("two consecutive stops in the same city")
    return {"title": title, "total_nights": sum(s["nights"] for s in stops), "cities": cities}


def translate_phrase(text, target_language):
    return {"translation": f"[{target_language}] {text}"}
