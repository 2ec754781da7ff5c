"""The engine's warning class, and a warning given once per cause (a slower path taken for a reason the
user can act on is said once, not at every call)."""
from __future__ import annotations

import warnings

__all__ = ["AttributionWarning", "warn_once"]


class AttributionWarning(UserWarning):
    """Something in the inputs was changed to make them fit (truncation, re-decoded responses), or the
    engine took a slower path than it could have (and says how to avoid it)."""


_SAID: set = set()


def warn_once(key, message: str, stacklevel: int = 3) -> None:
    """:class:`AttributionWarning` ``message``, the first time ``key`` is seen in this process."""
    if key in _SAID:
        return
    _SAID.add(key)
    warnings.warn(message, AttributionWarning, stacklevel=stacklevel)
