"""Named exceptions of the factory.

Each one says what went wrong *and what to do about it*: these messages reach users of the CLI, the
Ray jobs and the HTTP API unchanged, so they must be actionable without reading the code.
"""
from __future__ import annotations


class TokenFactoryError(Exception):
    """Base class of every error raised on purpose by tokenfactory."""


class MalformedMarker(TokenFactoryError, ValueError):
    """A `<concept:...>` marker whose id is not a valid concept id, or an unclosed marker."""


class UnknownConceptMarker(TokenFactoryError, KeyError):
    """A prompt names a concept for which no token vector was given."""

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


class UnknownWord(TokenFactoryError, KeyError):
    """A word has no ids in the backbone's (possibly trimmed) vocabulary."""

    def __str__(self) -> str:
        return self.args[0]


class EmptyVocabulary(TokenFactoryError, ValueError):
    """An attribute vocabulary that leaves no usable word for the subspace."""


class UnknownVocabulary(TokenFactoryError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


class UnknownBackbone(TokenFactoryError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


class DimensionMismatch(TokenFactoryError, ValueError):
    """A token vector or feature whose dimension does not match the backbone."""


class EmptyImageSet(TokenFactoryError, ValueError):
    """A concept with no (usable) images to learn from."""


class NonFiniteLoss(TokenFactoryError, FloatingPointError):
    """The objective became NaN or infinite during learning."""


class WeightsError(TokenFactoryError, ValueError):
    """Backbone weights that are missing, unreadable, or do not fit the named config."""


class BackboneMismatch(TokenFactoryError, ValueError):
    """Parts of a backbone that are not a pair: a pipeline whose text encoder is not the CLIP's text tower."""


class SamplingCancelled(TokenFactoryError):
    """Sampling stopped because its caller asked (a request that timed out or whose client went away)."""


class CatalogError(TokenFactoryError, ValueError):
    """A catalog that cannot be onboarded as it is (e.g. image URIs outside the catalog)."""
