"""Errors raised by the dataset readers and the downloader."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset is missing, incomplete or corrupt, or cannot be downloaded.

    The message names the files expected, the folder(s) looked in, and how to obtain them
    (``download=True``, CLI ``--download``; :func:`sddpm.data.download`; or a URL).
    """


class ChecksumError(DatasetError):
    """A downloaded file's checksum does not match the published one."""
