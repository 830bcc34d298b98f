"""Errors that reach users as one clear message instead of a traceback."""


class FmkerasError(Exception):
    """Base class: the command line prints the message and exits with status 2."""


class ConfigError(FmkerasError):
    """A recipe or override names an unknown key, a wrong type or a bad value."""


class DataError(FmkerasError):
    """An input file is missing, unreadable or malformed."""


class TrainingError(FmkerasError):
    """Training cannot continue (e.g. the loss became NaN)."""


class Stopped(FmkerasError):
    """Training stopped on request (SIGTERM) after writing a backup: the command
    prints the message (how to resume) and exits 0."""
