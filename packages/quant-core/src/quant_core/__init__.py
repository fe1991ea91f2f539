"""quant-core: ModelSlim quantization schemes, kernels and checkpoint handling, framework-agnostic.

>>> import quant_core
>>> desc = quant_core.QuantDescription.from_dict({"model.layers.0.mlp.down_proj.weight": "W8A8_DYNAMIC"})
>>> desc.quant_type_for("model.layers.0.mlp.down_proj", "linear")
'W8A8_DYNAMIC'
"""

from quant_core import schemes  # noqa: F401  (registers the built-in schemes)
from quant_core.checkpoint import weight_map
from quant_core.description import (
    DESCRIPTION_FILE,
    QuantDescription,
    find_description,
    is_modelslim_checkpoint,
    layer_id,
)
from quant_core.embedding import EMBEDDING_SCHEMES, EmbeddingTable, embedding_lookup, prepare_embedding
from quant_core.errors import (
    CheckpointFileError,
    CheckpointTensorError,
    DescriptionError,
    DescriptionNotFoundError,
    LayerLookupError,
    MixedShardsError,
    QuantCoreError,
    SchemeRegistrationError,
    UnsafePathError,
    UnsupportedSchemeError,
)
from quant_core.lookup import quant_type_for
from quant_core.quant_types import FLOAT, LAYER_KINDS, MODELSLIM_QUANT_TYPES
from quant_core.registry import (
    DEFAULT_REGISTRY,
    SchemeRegistry,
    get_scheme,
    register_scheme,
    scheme_class,
    supported_schemes,
)
from quant_core.schemes.base import AttentionScheme, LinearScheme, MoEScheme, Scheme
from quant_core.spec import Sharding, TensorSpec, check_tensors

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REGISTRY",
    "DESCRIPTION_FILE",
    "EMBEDDING_SCHEMES",
    "FLOAT",
    "LAYER_KINDS",
    "MODELSLIM_QUANT_TYPES",
    "AttentionScheme",
    "CheckpointFileError",
    "CheckpointTensorError",
    "DescriptionError",
    "DescriptionNotFoundError",
    "EmbeddingTable",
    "LayerLookupError",
    "LinearScheme",
    "MixedShardsError",
    "MoEScheme",
    "QuantCoreError",
    "QuantDescription",
    "Scheme",
    "SchemeRegistrationError",
    "SchemeRegistry",
    "Sharding",
    "TensorSpec",
    "UnsafePathError",
    "UnsupportedSchemeError",
    "check_tensors",
    "embedding_lookup",
    "find_description",
    "get_scheme",
    "is_modelslim_checkpoint",
    "layer_id",
    "prepare_embedding",
    "quant_type_for",
    "register_scheme",
    "scheme_class",
    "supported_schemes",
    "weight_map",
]
