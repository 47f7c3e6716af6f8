"""The one error type of :mod:`polar.formats`, in a module of its own: the readers (files) call the validators
(validate) lazily, and both raise it, so neither imports the other for it."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """A path or object holds no adapter this package can read, its files are malformed (unreadable or truncated
    weights, wrong JSON types, factors of the wrong shape, rank or dtype, non-finite values), or it is ambiguous
    which adapter to read. The message names the file, the field or module and what to do; the CLI prints it as
    one line."""
