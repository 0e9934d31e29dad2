"""Exception types. Every error a user can cause names what was wrong and what was expected."""


class MMBalanceError(Exception):
    """Base class of every error raised by mmbalance on bad input or configuration."""


class ConfigError(MMBalanceError, ValueError):
    """A configuration key or value is unknown or invalid."""


class RegistryError(MMBalanceError, KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(MMBalanceError, ValueError):
    """A dataset file, sample, field or array is missing or malformed."""


class MethodSetupError(MMBalanceError, ValueError):
    """A method cannot run in the requested setup (e.g. too many modalities)."""


class ModelSetupError(MMBalanceError, ValueError):
    """A user-supplied model or encoder does not fit what the trainer needs."""
