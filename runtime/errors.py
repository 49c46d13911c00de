"""Errors a user can act on; the CLI prints them without a traceback."""


class Vlm2omError(Exception):
    """Base class: the message names the file, key, shape or gear at fault."""


class BundleError(Vlm2omError):
    """The bundle is missing, altered, or from an unknown schema."""


class InputError(Vlm2omError):
    """Bad user input: an unreadable image, a prompt that fits no gear, a bad option."""
