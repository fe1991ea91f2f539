"""The exceptions quant-core raises. Every message names the tensor or layer, what was expected and a fix.

Each class also derives from the built-in exception a caller would otherwise catch (``ValueError``,
``LookupError``, ``NotImplementedError``, ``FileNotFoundError``), so existing ``except`` clauses keep working.
None of them is a ``KeyError``: its ``str()`` quotes the message and hides the line breaks.
"""


class QuantCoreError(Exception):
    """Base class of every error quant-core raises on purpose."""


class DescriptionError(QuantCoreError, ValueError):
    """``quant_model_description.json`` is malformed or contradicts itself."""


class DescriptionNotFoundError(DescriptionError, FileNotFoundError):
    """A checkpoint directory has no ``quant_model_description.json``."""


class LayerLookupError(DescriptionError, LookupError):
    """The description has no entry for a layer the model asks about."""


class MixedShardsError(DescriptionError):
    """The shards of one fused module (q/k/v, gate/up, experts) carry different quant types."""


class UnsupportedSchemeError(QuantCoreError, NotImplementedError):
    """No scheme is registered for a (quant type, layer kind) pair."""


class SchemeRegistrationError(QuantCoreError, ValueError):
    """A scheme was registered twice or under an invalid layer kind."""


class CheckpointTensorError(QuantCoreError, ValueError):
    """A checkpoint tensor is missing or has the wrong shape, dtype or values."""


class CheckpointFileError(QuantCoreError, ValueError):
    """A file the checkpoint needs (``config.json``, a shard, a file the description names) is missing or unusable."""


class UnsafePathError(CheckpointFileError):
    """A file name inside the checkpoint (index, description) points outside the checkpoint directory."""
