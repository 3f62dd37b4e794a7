"""Errors the converter raises for bad input; the CLI turns each into one line and exit 2.

Anything else that escapes is an internal failure (exit 1).
"""

from __future__ import annotations


class ConvertError(ValueError):
    """Bad input or usage: the message names the file, the field, the value and the limit."""


class ModelError(ConvertError):
    """The model file: missing, not ONNX, corrupt, unreadable external data, not runnable."""


class DataError(ConvertError):
    """The sample data or labels: missing inputs, wrong dtype or shape, wrong length."""


class OptionError(ConvertError):
    """An option out of range or a combination that makes no sense."""


class OutputError(ConvertError):
    """An output path that cannot be written."""


class ToleranceError(ConvertError):
    """No candidate the search found stays within ``max_drop``."""
