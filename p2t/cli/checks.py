"""Command-line argument checks shared by every command: a bad argument is one line naming it, exit code 2.

A command raises :class:`ArgumentError`; :func:`p2t.cli.main` prints ``p2t <command>: error: <message>`` on
stderr and returns 2.

Paths and hub ids: an argument that takes only a file (data, config, image) must exist. One that also takes
a Hugging Face hub id (``--policy``, ``--prm``, tokenizers) is a path when it exists or starts with ``/``,
``./``, ``../`` or ``~`` (a missing one is an error at once); otherwise it is a hub id, whose load failure
(no network, not in the local cache, not a valid id) becomes one line naming the argument
(:func:`loading`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

__all__ = ["ArgumentError", "is_path_like", "is_hub_id", "check_file", "check_model", "check_output", "loading"]

_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


class ArgumentError(Exception):
    """A bad command-line argument (the message names it)."""


def is_path_like(value: str) -> bool:
    """``value`` is meant as a path: it starts with ``/``, ``./``, ``../`` or ``~`` (or is ``.``/``..``)."""
    return value in (".", "..") or value.startswith(_PATH_PREFIXES) or os.path.isabs(value)


def _exists(value: str) -> bool:
    return os.path.exists(os.path.expanduser(value))


def is_hub_id(value: Optional[str]) -> bool:
    """``value`` names a model on the Hugging Face hub: not an existing path and not path-like."""
    return bool(value) and not _exists(value) and not is_path_like(value)


def check_file(flag: str, value: Optional[str]) -> Optional[str]:
    """A file or directory argument that must exist (``None``: not given)."""
    if value is not None and not _exists(value):
        raise ArgumentError(f"{flag}: no such file or directory: {value}")
    return value


def check_model(flag: str, value: Optional[str]) -> Optional[str]:
    """A local path or a hub id: a path-like value must exist; a hub id is checked when loaded."""
    if value is not None and not _exists(value) and is_path_like(value):
        raise ArgumentError(f"{flag}: no such file or directory: {value}")
    return value


def check_output(flag: str, value: Optional[str]) -> Optional[str]:
    """An output file: its directory must exist."""
    if value is not None:
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(value)))
        if not os.path.isdir(parent):
            raise ArgumentError(f"{flag}: no such directory: {os.path.dirname(value) or parent}")
    return value


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id, or no huggingface_hub: not cached
        return False
    return isinstance(hit, str)


@contextmanager
def loading(**flags: Optional[str]):
    """Around the loads of the models named by ``flags`` (flag -> value, e.g. ``{"--prm": "Qwen/..."}``;
    underscores in a keyword stand for dashes): a hub id that is not in the local cache fails at once when
    the hub is offline (``HF_HUB_OFFLINE``), and a load that fails with ``OSError`` (no network, no such
    repository, an id that is not one) becomes one line naming the argument."""
    hub = {"--" + f.lstrip("-").replace("_", "-"): v for f, v in flags.items() if is_hub_id(v)}
    if _offline():
        for flag, value in hub.items():
            if not _cached(value):
                raise ArgumentError(f"{flag}: {value!r} is not a local path and not in the local Hugging Face "
                                    "cache (the hub is offline: HF_HUB_OFFLINE)")
    try:
        yield
    except OSError as e:
        named = [f for f, v in hub.items() if v in str(e)] or [f for f, v in hub.items() if not _cached(v)]
        if not named:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArgumentError(f"{named[0]}: cannot load {hub[named[0]]!r}: not a local path, and the Hugging Face "
                            f"hub did not provide it ({first})") from None
