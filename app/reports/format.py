"""Reading loosely-shaped report values and formatting them for people: bytes, MACs, ms, ratios.

Reports come from workers of any version, so every reader here tolerates missing keys, nulls and
wrong types, answering None (shown as an em dash) rather than raising.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

DASH = "—"
MINUS = "−"


def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes too, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def get(value: Any, *path: str | int) -> Any:
    """`value[path[0]][path[1]]…`, or None where a key is missing or a level is not a container."""
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def num(value: Any) -> float | None:
    """A finite number, or None (booleans and numeric strings are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def dict_of(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def list_of(value: Any) -> list:
    return value if isinstance(value, list) else []


def batch_keys(*mappings: Any) -> list[str]:
    """The batch-size keys of several `{"<batch>": …}` mappings, in numeric order."""
    keys = {str(k) for m in mappings for k in dict_of(m)}
    return sorted(keys, key=lambda k: (0, int(k)) if k.isdigit() else (1, k))


def significant(value: float, digits: int = 3) -> str:
    """`value` with `digits` significant digits, without scientific notation for everyday sizes."""
    if value == 0:
        return "0"
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    return f"{value:.{decimals}f}"


def trimmed(value: float, digits: int = 4) -> str:
    """Like `significant`, without trailing zeros: 0.5000 → "0.5", 30.0 → "30"."""
    text = significant(value, digits)
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_bytes(value: Any) -> str:
    n = num(value)
    if n is None:
        return DASH
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{significant(n / scale)} {unit}"
    return f"{int(n)} B"


def fmt_count(value: Any, unit: str = "") -> str:
    """1 458 816 → "1.46 M"; with `unit` "MACs" → "1.46 M MACs"."""
    n = num(value)
    if n is None:
        return DASH
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            text = f"{significant(n / scale)} {suffix}"
            break
    else:
        text = f"{int(n)}"
    return f"{text} {unit}".strip() if unit else text


def fmt_ms(value: Any) -> str:
    n = num(value)
    if n is None:
        return DASH
    if abs(n) < 0.1:
        return f"{significant(n * 1000)} µs"
    return f"{significant(n)} ms"


def fmt_ms_tick(value: float) -> str:
    """An axis tick in ms (or µs below 0.1 ms), without trailing zeros; zero is just "0"."""
    if value == 0:
        return "0"
    if abs(value) < 0.1:
        return f"{trimmed(value * 1000)} µs"
    return f"{trimmed(value)} ms"


def fmt_percent(value: Any, decimals: int = 2) -> str:
    n = num(value)
    return DASH if n is None else f"{n * 100:.{decimals}f}%"


def fmt_float(value: Any, digits: int = 4) -> str:
    n = num(value)
    return DASH if n is None else significant(n, digits)


def fmt_ratio(value: Any) -> str:
    """A speed or size ratio: two decimals below 2×, one above (3.1×, 1.15×)."""
    n = num(value)
    if n is None:
        return DASH
    return f"{n:.2f}×" if n < 2 else f"{n:.1f}×"


def fmt_value(value: Any) -> str:
    """Any cell of a free-form table (a layer's details): numbers, text, lists, dicts."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", "\u2009")
    if isinstance(value, float):
        return trimmed(value) if num(value) is not None else DASH
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def speedup_phrase(speedup: float, batch: str, interval: tuple[float, float] | None = None) -> str:
    """ "3.1× faster at batch 32" (or "1.3× slower …"); "no clear speed-up at batch 32 (0.97–1.04×)"
    when the speed-up's confidence interval includes 1.0."""
    if interval is not None and interval[0] <= 1.0 <= interval[1]:
        return f"no clear speed-up at batch {batch} ({interval[0]:.2f}–{interval[1]:.2f}×)"
    if speedup >= 1:
        return f"{fmt_ratio(speedup)} faster at batch {batch}"
    return f"{fmt_ratio(1 / speedup)} slower at batch {batch}"


def size_phrase(ratio: float) -> str:
    """ "3.9× smaller" from baseline bytes / result bytes (or "1.2× larger")."""
    return f"{fmt_ratio(ratio)} smaller" if ratio >= 1 else f"{fmt_ratio(1 / ratio)} larger"


def accuracy_phrase(drop: float) -> str:
    """ "−0.2 pt accuracy" from a drop of 0.002 (percentage points, with a true minus sign)."""
    points = -drop * 100
    if round(points, 1) == 0:
        return "±0.0 pt accuracy"
    sign = "+" if points > 0 else MINUS
    return f"{sign}{abs(points):.1f} pt accuracy"
