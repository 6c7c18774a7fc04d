"""Errors that carry a one-line message a user can act on."""

from __future__ import annotations


class RANOInputError(ValueError):
    """Bad input: the message names the file (or option) and what is wrong with it.

    The CLI prints it as one line and exits with status 2, leaving no output behind.
    """


class BundleError(RANOInputError):
    """A model bundle that is malformed, corrupted or does not match the inputs."""


class DeviceError(RANOInputError):
    """An unknown or unavailable compute device."""
