"""Atomic checkpoints: written to a temporary file in the same folder, flushed, then renamed over the
old one, so a run killed mid-write leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import tempfile

import torch


def save_checkpoint(path: str, state: dict):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location=None) -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)
