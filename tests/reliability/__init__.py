"""Helpers for the reliability tests: real worker processes, a restartable Redis, checks."""
