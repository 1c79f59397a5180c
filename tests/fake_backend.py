"""Kept for older imports: the fake backend lives in ``gateway.testing``."""

from gateway.testing.fake_backend import FakeBackend, Seen

__all__ = ["FakeBackend", "Seen"]
