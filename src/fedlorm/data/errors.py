"""Errors raised by the dataset loaders."""


class DatasetNotFoundError(ValueError):
    """A dataset is not on disk and may not be downloaded; the message says how to get it."""
