"""Helpers shared by the data tests."""
from __future__ import annotations

import logging

from ld3m_fast.data import decode


class CountingDecoder:
    """Counts the images decoded in this process (patched in through `monkeypatch`)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self._real = decode.decode_image_file
        monkeypatch.setattr(decode, "decode_image_file", self)

    def __call__(self, path, res):
        self.calls += 1
        return self._real(path, res)


def logged_warnings(caplog) -> list[str]:
    """The warnings logged while `caplog` captured."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
