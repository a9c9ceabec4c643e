"""One error type for bad user input: CLIs print its message as a single line."""


class M2R2Error(Exception):
    """A user-facing error: missing/corrupt file, unsupported architecture,
    shape mismatch, unknown config key, prompt longer than the cache, ..."""
