"""Named exceptions of the factory.

Each one says what went wrong *and what to do about it*: these messages reach users of the CLI, the
Ray jobs and the HTTP API unchanged, so they must be actionable without reading the code.
"""

from __future__ import annotations


class TokenFactoryError(Exception):
    """Base class of every error raised on purpose by tokenfactory.

    Each class carries the answer it deserves over HTTP (``http_status``, ``code``): the service maps an
    error by these two attributes alone, and the CLI prints any of them as one line and exits 2. A
    subclass that also derives from a builtin (ValueError, KeyError, OSError…) keeps working with code
    that catches the builtin.
    """

    http_status: int = 422
    code: str = "bad_request"

    def __reduce__(self):
        # Pickled as (class, args, attributes) and rebuilt *without* calling __init__ (as Ray Train v2's
        # errors define their own __reduce__): Ray re-raises a remote error from its pickle, and the default
        # (class, args) calls __init__ with the message, which a subclass whose __init__ takes other
        # arguments (UnknownConceptMarker's concept ids, StorageError's uri) turns into a wrong error.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> TokenFactoryError:
    """A `TokenFactoryError` from `TokenFactoryError.__reduce__`'s parts: the same message, attributes and class."""
    err = cls.__new__(cls, *args)  # the builtin base's __new__ (OSError's for StorageError), never __init__
    err.args = args
    err.__dict__.update(state)
    return err


class MalformedMarker(TokenFactoryError, ValueError):
    """A `<concept:...>` marker whose id is not a valid concept id, or an unclosed marker."""

    code = "malformed_marker"


class UnknownConceptMarker(TokenFactoryError, KeyError):
    """A prompt names a concept for which no token vector was given."""

    http_status, code = 404, "unknown_concept"

    def __init__(self, missing: list[str], known: int | None = None):
        self.missing = list(missing)
        hint = f" ({known} concepts are known)" if known is not None else ""
        super().__init__(
            f"no token for concept(s) {', '.join(self.missing)}{hint}: learn them first, or check the "
            "spelling of the <concept:ID> markers"
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PromptTooLong(TokenFactoryError, ValueError):
    """A prompt does not fit the text encoder's context length."""

    code = "prompt_too_long"


class UnknownWord(TokenFactoryError, KeyError):
    """A word has no ids in the backbone's (possibly trimmed) vocabulary."""

    code = "unknown_word"

    def __str__(self) -> str:
        return self.args[0]


class EmptyVocabulary(TokenFactoryError, ValueError):
    """An attribute vocabulary that leaves no usable word for the subspace."""

    code = "empty_vocabulary"


class UnknownVocabulary(TokenFactoryError, KeyError):
    http_status, code = 404, "unknown_vocabulary"

    def __str__(self) -> str:
        return self.args[0]


class UnknownBackbone(TokenFactoryError, KeyError):
    http_status, code = 404, "unknown_backbone"

    def __str__(self) -> str:
        return self.args[0]


class DimensionMismatch(TokenFactoryError, ValueError):
    """A token vector or feature whose dimension does not match the backbone."""

    code = "dimension_mismatch"


class EmptyImageSet(TokenFactoryError, ValueError):
    """A concept with no (usable) images to learn from."""

    code = "empty_image_set"


class NonFiniteLoss(TokenFactoryError, FloatingPointError):
    """The objective became NaN or infinite during learning."""

    http_status, code = 500, "non_finite_loss"


class WeightsError(TokenFactoryError, ValueError):
    """Backbone weights that are missing, unreadable, or do not fit the named config."""

    http_status, code = 500, "bad_weights"


class BackboneMismatch(TokenFactoryError, ValueError):
    """Parts of a backbone that are not a pair: a pipeline whose text encoder is not the CLIP's text tower."""

    http_status, code = 500, "backbone_mismatch"


class SamplingCancelled(TokenFactoryError):
    """Sampling stopped because its caller asked (a request that timed out or whose client went away)."""

    http_status, code = 503, "sampling_cancelled"


class CatalogError(TokenFactoryError, ValueError):
    """A catalog that cannot be onboarded as it is (e.g. image URIs outside the catalog)."""


class ConfigError(TokenFactoryError, ValueError):
    """A configuration value that cannot work (a config's ``__post_init__`` or a device/resource check)."""

    code = "bad_config"


class DeviceError(TokenFactoryError, RuntimeError):
    """A device request that cannot be met (no GPU where one was asked for, or more workers than GPUs)."""

    http_status, code = 503, "device_unavailable"
