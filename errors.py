"""Bad input, reported in one line.

UsageError is what train.py and eval.py print as a single `error: ...` line and a non-zero
exit: a bad flag or value, a checkpoint that does not fit the run, a run that diverged. Any
other exception is a bug in this code and keeps its traceback, so it is never mistaken for a
user's mistake. OneLineParser makes argparse's own errors one line as well.
"""
import argparse


class UsageError(ValueError):
    """Something the person running the script can fix from the message alone."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, not a usage dump
        self.exit(2, f"error: {message} (see --help)\n")
