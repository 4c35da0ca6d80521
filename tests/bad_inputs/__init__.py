"""Hostile and broken inputs, built by code (no committed binaries): see `corpus.py`.

`CASES` lists every case; `tally` records what the tests saw, and `summary_line()` is the line
the suite prints at the end ("bad inputs: N cases tried, M handled", a case counting as handled
only when both its API and its CLI path ran and passed).
"""

from .corpus import CASES, Attempt, Case, cases_in, summary_line, tally

__all__ = ["CASES", "Attempt", "Case", "cases_in", "summary_line", "tally"]
