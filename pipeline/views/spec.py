"""Policy strings -> ``ViewPolicy``: ``op | op:arg | op:key=value,key=value``.

An op's bare values fill its arguments in order (``cutout:0.5`` is ``cutout:size=0.5``); a range is
``lo..hi`` (``rrc-flip:scale=0.35..1``). Errors are one line that names the op and the character
where the problem starts.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from kdcache.stores.errors import SpecError
from kdcache.views.base import ViewOp
from kdcache.views.policy import ViewPolicy


def parse_value(text: str) -> Any:
    """'4' -> 4, '0.5' -> 0.5, '0.08..1' -> [0.08, 1.0], anything else stays a string."""
    if ".." in text:
        return [parse_value(part) for part in text.split("..")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def parse_policy(text: str, ops: dict[str, type[ViewOp]]) -> ViewPolicy:
    """Parse a policy string against the op registry ``ops``."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"a view policy must be a non-empty string such as 'crop-flip'; got {text!r}")
    parsed, at = [], 0
    for part in text.split("|"):
        start = at + (len(part) - len(part.lstrip()) if part.strip() else 0)
        at += len(part) + 1
        parsed.append(parse_op(part.strip(), text, start, ops))
    return ViewPolicy(parsed)


def where(text: str, column: int) -> str:
    return f"at character {column + 1} of '{text}'"


def parse_op(part: str, text: str, column: int, ops: dict[str, type[ViewOp]]) -> ViewOp:
    if not part:
        raise SpecError(f"view policy: an empty op {where(text, column)}; write ops as 'a | b'")
    name, _, rest = part.partition(":")
    name = name.strip()
    cls = ops.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(ops), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"ops: {', '.join(ops)}"
        raise SpecError(f"view policy: unknown op '{name}' {where(text, column)}; {hint} (`kdcache list policies`)")
    names = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    args: dict[str, Any] = {}
    offset = column + len(name) + 1
    for item in rest.split(",") if rest.strip() else []:
        key, eq, value = item.partition("=")
        if not eq:  # a bare value: the next argument in order
            free = [n for n in names if n not in args]
            if not free:
                raise SpecError(f"view policy: op '{name}' takes {len(names)} argument(s) but got more "
                                f"{where(text, offset)}; its arguments: {', '.join(names) or 'none'}")
            key, value = free[0], item
        key, value = key.strip(), value.strip()
        if key not in names:
            raise SpecError(f"view policy: op '{name}' has no argument '{key}' {where(text, offset)}; its "
                            f"arguments: {', '.join(names) or 'none'}")
        if key in args:
            raise SpecError(f"view policy: op '{name}' got '{key}' twice {where(text, offset)}")
        args[key] = parse_value(value)
        offset += len(item) + 1
    try:
        return cls(**args)
    except SpecError as err:
        raise SpecError(f"{err} ({where(text, column)})") from None
    except (TypeError, ValueError) as err:
        raise SpecError(f"view policy: bad arguments for op '{name}' {where(text, column)}: {err}") from None
