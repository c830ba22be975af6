"""Mistakes on the command line: ``UsageError`` (one line on stderr, exit status
``USAGE_ERROR``) and ``Parser``, the argparse parser that raises it instead of printing its
usage block and exiting. Shared by ``nca-fast`` (``cli``) and ``nca-fast train`` (``train``).
"""
from __future__ import annotations

import argparse

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake of the user's: reported in one line, exit status ``USAGE_ERROR``."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (usage line + message, exit) turned into one UsageError line."""

    def error(self, message):
        raise UsageError(message)
