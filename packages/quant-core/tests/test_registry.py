import pytest
import torch

import quant_core
from quant_core import (
    AttentionScheme,
    LinearScheme,
    MoEScheme,
    SchemeRegistrationError,
    SchemeRegistry,
    TensorSpec,
    UnsupportedSchemeError,
)


class FakeLinear(LinearScheme):
    """The smallest concrete linear scheme: float weights, used only to exercise the registry."""

    def __init__(self, *, mode: str = "dynamic", **common):
        super().__init__(**common)
        self.mode = mode

    def weight_specs(self, in_features, out_features, params_dtype):
        return {"weight": TensorSpec("weight", (out_features, in_features), params_dtype, output_dim=0, input_dim=1)}

    def quantize_weights(self, weight, bias=None, **calibration):
        return {"weight": weight}

    def process_weights(self, tensors):
        return dict(tensors)

    def apply(self, runtime, x, bias=None):
        return torch.nn.functional.linear(x, runtime["weight"], bias)


class FakeMoE(MoEScheme):
    def weight_specs(self, num_experts, hidden_size, intermediate_size, params_dtype):
        return {}

    def quantize_weights(self, w13, w2):
        return {}

    def process_weights(self, tensors):
        return {}

    def apply(self, runtime, x, topk_weights, topk_ids, activation="silu"):
        return x


@pytest.fixture
def registry():
    return SchemeRegistry()


def test_register_and_get(registry):
    registry.register("W8A8_MIX", "linear")(FakeLinear)
    registry.register("W8A8_DYNAMIC", "moe")(FakeMoE)
    scheme = registry.get("W8A8_MIX", "linear", backend="reference", version="1.0.0", group_size=0, mode="static")
    assert isinstance(scheme, FakeLinear)
    assert (scheme.backend, scheme.version, scheme.group_size, scheme.mode) == ("reference", "1.0.0", 0, "static")
    assert registry.supported() == [("W8A8_DYNAMIC", "moe"), ("W8A8_MIX", "linear")]
    assert registry.supported("moe") == [("W8A8_DYNAMIC", "moe")]
    assert ("W8A8_MIX", "linear") in registry
    assert registry.scheme_class("W8A8_DYNAMIC", "moe") is FakeMoE


def test_a_registered_scheme_computes_through_the_contract(registry):
    registry.register("W8A8_MIX", "linear")(FakeLinear)
    scheme = registry.get("W8A8_MIX", "linear")
    weight = torch.randn(5, 3)
    specs = scheme.weight_specs(3, 5, torch.float32)
    tensors = scheme.quantize_weights(weight)
    quant_core.check_tensors(specs, tensors, "model.layers.0.mlp.down_proj")
    x = torch.randn(2, 3)
    torch.testing.assert_close(scheme.apply(scheme.process_weights(tensors), x), x @ weight.T)


def test_duplicate_registration_is_an_error(registry):
    registry.register("W8A8_MIX", "linear")(FakeLinear)

    class Other(FakeLinear):
        pass

    with pytest.raises(SchemeRegistrationError, match=r"\(W8A8_MIX, linear\) is already served by .*FakeLinear"):
        registry.register("W8A8_MIX", "linear")(Other)
    registry.register("W8A8_MIX", "moe")(FakeMoE)  # same type, other kind: fine


def test_registration_checks_kind_and_base_class(registry):
    with pytest.raises(SchemeRegistrationError, match="layer kind 'mlp'"):
        registry.register("W8A8", "mlp")
    with pytest.raises(SchemeRegistrationError, match="must subclass MoEScheme"):
        registry.register("W8A8", "moe")(FakeLinear)
    with pytest.raises(SchemeRegistrationError, match="non-empty string"):
        registry.register("", "linear")


def test_unknown_pair_lists_what_is_supported(registry):
    registry.register("W8A8_DYNAMIC", "linear")(FakeLinear)
    registry.register("W4A16", "moe")(FakeMoE)
    with pytest.raises(UnsupportedSchemeError) as info:
        registry.get("W4A16", "linear")
    message = str(info.value)
    assert "No linear scheme for quant type 'W4A16'" in message
    assert "Supported for linear layers: W8A8_DYNAMIC." in message
    assert "'W4A16' is registered for: moe layers." in message
    assert "msModelSlim can write this type" in message
    assert isinstance(info.value, NotImplementedError)


def test_typo_gets_a_suggestion(registry):
    with pytest.raises(UnsupportedSchemeError, match="did you mean 'W8A8_DYNAMIC'"):
        registry.get("w8a8_dynamc", "linear")
    with pytest.raises(UnsupportedSchemeError, match="Old MindIE-format"):
        registry.get("QWERTY", "linear")


def test_unknown_layer_kind_on_get(registry):
    with pytest.raises(UnsupportedSchemeError, match="unknown layer kind 'dense'"):
        registry.get("W8A8", "dense")


def test_unknown_option_is_reported_with_the_signature(registry):
    registry.register("W8A8_MIX", "linear")(FakeLinear)
    with pytest.raises(
        UnsupportedSchemeError,
        match=r"does not take these options: colour\. It accepts: backend, group_size, mode, version",
    ):
        registry.get("W8A8_MIX", "linear", colour="blue")


@pytest.mark.parametrize(
    ("options", "match"),
    [({"backend": "gpu"}, "backend must be one of auto, reference, cpu, npu"), ({"group_size": -8}, "group_size")],
)
def test_common_options_are_validated(registry, options, match):
    registry.register("W8A8_MIX", "linear")(FakeLinear)
    with pytest.raises(ValueError, match=match):
        registry.get("W8A8_MIX", "linear", **options)


def test_abstract_schemes_cannot_be_instantiated():
    for base in (LinearScheme, MoEScheme, AttentionScheme):
        with pytest.raises(TypeError, match="abstract"):
            base()

    class Incomplete(LinearScheme):
        def weight_specs(self, in_features, out_features, params_dtype):
            return {}

    with pytest.raises(TypeError, match="apply"):
        Incomplete()


def test_default_registry_is_what_the_package_functions_use():
    assert quant_core.register_scheme.__self__ is quant_core.DEFAULT_REGISTRY
    assert quant_core.get_scheme.__self__ is quant_core.DEFAULT_REGISTRY
    with pytest.raises(UnsupportedSchemeError):
        quant_core.get_scheme("NOT_A_TYPE", "linear")


def test_accepted_options(registry):
    registry.register("W8A8_MIX", "linear")(FakeLinear)
    assert registry.accepted_options("W8A8_MIX", "linear") == {"backend", "version", "group_size", "mode"}
    assert "row_parallel" in quant_core.registry.accepted_options("W4A8_DYNAMIC", "linear")
