"""Money: decimal strings in whole tokens at the API edge, ``int`` base units inside.

Never a float anywhere: ``"0.000001"`` with 18 decimals is exactly ``10**12``.
"""

from __future__ import annotations

import re

MONEY_PATTERN = r"^[0-9]+(\.[0-9]{1,18})?$"
_MONEY_RE = re.compile(MONEY_PATTERN)


class MoneyError(ValueError):
    """A money string that is not a non-negative decimal with at most ``decimals`` places."""


def to_base_units(amount: str, decimals: int = 18, field: str = "amount") -> int:
    """``"1.5"`` with 18 decimals → ``1_500_000_000_000_000_000``. Raises naming ``field``."""
    if not isinstance(amount, str) or not _MONEY_RE.match(amount):
        raise MoneyError(f"{field}: {amount!r} is not a decimal string like '1.25' (pattern {MONEY_PATTERN})")
    whole, _, fraction = amount.partition(".")
    if len(fraction) > decimals:
        raise MoneyError(f"{field}: {amount!r} has more than {decimals} decimal places")
    return int(whole + fraction.ljust(decimals, "0"))


def to_decimal_string(base_units: int, decimals: int = 18) -> str:
    """The inverse of ``to_base_units``, without trailing zeros: ``10**18`` → ``"1"``."""
    sign = "-" if base_units < 0 else ""
    whole, fraction = divmod(abs(base_units), 10**decimals)
    text = f"{whole}.{fraction:0{decimals}d}".rstrip("0").rstrip(".") if decimals else str(whole)
    return sign + text
