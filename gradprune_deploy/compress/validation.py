"""Small value checks the config parts share (torch-free)."""

from __future__ import annotations

from ..errors import ConfigError


def int_or_word(value, flag: str, words: tuple[str, ...], *, minimum: int):
    """An int (or its digits as a string), or one of `words`; anything else is a ConfigError."""
    if value is None or (isinstance(value, str) and value in words):
        return value
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
        raise ConfigError(f"{flag}: expected an integer{' or ' + ' or '.join(words) if words else ''}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ConfigError(f"{flag}: must be at least {minimum}, got {value}")
    return value


def require_at_least_one(config, names: tuple[str, ...]) -> None:
    """`--name must be at least 1, got N` for the first of `names` below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
