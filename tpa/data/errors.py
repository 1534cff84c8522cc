"""The one error type of data preparation."""


class DataError(ValueError):
    """Bad input for data preparation; the message says what and where."""
