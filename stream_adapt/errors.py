"""One root error for the package.

Bad *records* are not exceptions: decoding returns a `DecodeError` value (see `events.py`) so one bad
record never stops the stream. Exceptions are for the operator: bad configuration, a model directory
that does not load, a broker that cannot be reached.
"""


class StreamAdaptError(Exception):
    """Root of every error stream-adapt raises on purpose."""


class ConfigError(StreamAdaptError):
    """The configuration is invalid; the message names the field."""


class ModelLoadError(StreamAdaptError):
    """A model directory or a received adapter could not be loaded safely."""


class KafkaUnavailable(StreamAdaptError):
    """Kafka could not be reached (yet): worth retrying, unlike a missing topic or a bad credential."""
