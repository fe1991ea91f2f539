"""The ``vllm.general_plugins`` entry point: registers the config in every vLLM process."""

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Register ``AscendModelSlimConfig`` as ``"modelslim"`` and, unless another package owns it, ``"ascend"``."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from vllm_adapter.config import AscendModelSlimConfig, ModelSlimAliasConfig

    if "modelslim" not in QUANTIZATION_METHODS:
        register_quantization_config("modelslim")(ModelSlimAliasConfig)
    if "ascend" not in QUANTIZATION_METHODS:
        register_quantization_config("ascend")(AscendModelSlimConfig)
    else:
        from vllm.model_executor.layers.quantization import get_quantization_config

        owner = get_quantization_config("ascend")
        if owner is not AscendModelSlimConfig:
            logger.warning(
                "quantization 'ascend' is already served by %s.%s; vllm-adapter is available as "
                "--quantization modelslim.", owner.__module__, owner.__qualname__,
            )  # fmt: skip
