"""Exceptions raised by dropcheck: one clear message naming the problem."""


class DropcheckError(ValueError):
    """Bad input to dropcheck (shape, value, name, configuration)."""


class NoDropoutSiteError(DropcheckError):
    """The model contains no dropout site with q > 0."""


class DataError(DropcheckError):
    """A corpus or data file is missing or malformed."""
