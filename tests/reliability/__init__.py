"""Reliability suite: real processes on loopback, every run bounded; figures go to docs/reliability.md."""
