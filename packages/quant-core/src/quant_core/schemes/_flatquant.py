"""What the FlatQuant linear schemes share: the transform tensors, their validation, and folding the inverse
transform into the weight.

The transform (``kernels/flatquant.py``): each token ``x`` viewed row-major as ``X [a, b]`` (``a · b = K``) becomes
``X̃ = left_transᵀ · X · right_trans``, i.e. ``x̃ = x · (L ⊗ R)`` with ``L``/``R`` the checkpoint's matrices.
``(a, b) = get_decompose_dim(K)`` except where msModelSlim writes otherwise: its o_proj carries only ``left_trans
[num_heads, num_heads]`` (the head-dim factor is folded into v_proj), so ``right_trans`` is the identity there.

Options: ``weight_specs`` cannot know ``num_heads``, so ``left_dim`` (default ``get_decompose_dim(K)[0]``) and
``has_right_trans`` (default True) shape the specs for adapters that allocate parameters before loading.
``process_weights`` reads the dims off the checkpoint instead (square ``left_trans`` whose size divides K; a
``right_trans``, if the scheme allows leaving it out, only when present).
"""

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.base import Runtime
from quant_core.primitives import get_decompose_dim
from quant_core.schemes._linear import KernelLinearScheme, check_scale, scale_spec
from quant_core.spec import TensorSpec


def fold_inverse_transform(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """``W' = W · (L ⊗ R)^-T``, so that ``(x · (L ⊗ R)) · W'ᵀ = x · Wᵀ``.

    Row-major ``vec(A X B) = vec(X) · (Aᵀ ⊗ B)``; with ``A = L⁻¹``, ``B = R⁻ᵀ`` each row ``W_n`` viewed as ``[a, b]``
    becomes ``L⁻¹ · W_n · R⁻ᵀ``. Solved in float64; no right factor means ``R = I``.
    """
    n, k = weight.shape
    a = left.shape[0]
    w = torch.linalg.solve(left.double(), weight.double().reshape(n, a, k // a))
    if right is not None:
        w = torch.linalg.solve(right.double(), w.transpose(1, 2)).transpose(1, 2)
    return w.reshape(n, k).to(torch.float32)


def _calibration_matrix(t: torch.Tensor, name: str, size: int | None, k: int) -> torch.Tensor:
    ok = t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] > 0
    ok = ok and (k % t.shape[0] == 0 if size is None else t.shape[0] == size)
    if not ok:
        want = f"[{size}, {size}]" if size is not None else f"[a, a] with a dividing in_features {k}"
        raise CheckpointTensorError(f"calibration {name} has shape {tuple(t.shape)}, expected {want}.")
    if not torch.isfinite(t).all():
        raise CheckpointTensorError(f"calibration {name} contains NaN or Inf.")
    return t.float()


class FlatQuantLinear(KernelLinearScheme):
    """A FlatQuant transform in front of an inner per-token scheme. Subclasses give the inner scheme's
    ``inner_specs`` / ``quantize_inner`` / ``canonicalize_inner`` and the ``KERNELS``."""

    right_trans_optional: ClassVar[bool] = True
    uses_clip_ratio: ClassVar[bool] = False  # only int4 activations scale their range by it

    def __init__(self, *, left_dim: int | None = None, has_right_trans: bool = True, **options: Any) -> None:
        super().__init__(**options)
        if left_dim is not None and (isinstance(left_dim, bool) or not isinstance(left_dim, int) or left_dim < 1):
            raise ValueError(f"left_dim must be a positive integer (o_proj: num_heads) or None, got {left_dim!r}")
        if not has_right_trans and not self.right_trans_optional:
            raise ValueError(f"{self.quant_type} always has a right_trans (npu_kronecker_quant takes both factors)")
        self.left_dim = left_dim
        self.has_right_trans = has_right_trans

    # --- subclass hooks ------------------------------------------------------------------------------------
    def inner_specs(self, in_features: int, out_features: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def quantize_inner(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def canonicalize_inner(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def checkpoint_options(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, Any]:
        """Option values read off the checkpoint, overriding the constructor's for ``process_weights``."""
        found: dict[str, Any] = {}
        left, weight = tensors.get("left_trans"), tensors.get("weight")
        if left is not None and weight is not None and weight.dim() == 2:
            k = self.layer_shape(tensors)[0]
            if left.dim() != 2 or left.shape[0] != left.shape[1] or not left.shape[0] or k % left.shape[0]:
                raise CheckpointTensorError(
                    f"tensor {layer + '.' if layer else ''}left_trans has shape {tuple(left.shape)}, expected a "
                    f"square [a, a] with a dividing in_features {k} (each token is viewed as an [a, {k}/a] matrix). "
                    "The checkpoint does not belong to this layer, or was not written by FlatQuant."
                )
            found["left_dim"] = left.shape[0]
        if self.right_trans_optional:
            found["has_right_trans"] = "right_trans" in tensors
        return found

    # --- the scheme API ------------------------------------------------------------------------------------
    def transform_dims(self, in_features: int) -> tuple[int, int]:
        a = self.left_dim or get_decompose_dim(in_features)[0]
        if in_features % a:
            raise CheckpointTensorError(
                f"{self.quant_type}: left_dim {a} does not divide in_features {in_features}; FlatQuant views each "
                f"token as an [a, K/a] matrix. Pass a divisor of {in_features} (o_proj: num_heads)."
            )
        return a, in_features // a

    def weight_specs(self, in_features: int, out_features: int, params_dtype: torch.dtype) -> dict[str, TensorSpec]:
        a, b = self.transform_dims(in_features)
        specs = {
            **self.inner_specs(in_features, out_features),
            "left_trans": scale_spec("left_trans", (a, a)),
            "clip_ratio": dataclasses.replace(scale_spec("clip_ratio", (1,)), validated_only=not self.uses_clip_ratio),
        }
        if self.has_right_trans:
            specs["right_trans"] = scale_spec("right_trans", (b, b))
        return specs

    def quantize_weights(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        left_trans: torch.Tensor | None = None,
        right_trans: torch.Tensor | None = None,
        clip_ratio: float | torch.Tensor | None = None,
        **calibration: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Fold the inverse transform into ``weight`` (identity transforms and ``clip_ratio = 1`` when not given),
        then quantize the folded weight as the inner scheme does."""
        k = weight.shape[1]
        if left_trans is None:
            left = torch.eye(self.transform_dims(k)[0], device=weight.device)
        else:
            left = _calibration_matrix(left_trans, "left_trans", None, k)
        b = k // left.shape[0]
        right = None
        if right_trans is not None:
            right = _calibration_matrix(right_trans, "right_trans", b, k)
        elif self.has_right_trans:
            right = torch.eye(b, device=weight.device)
        clip = 1.0 if clip_ratio is None else float(clip_ratio)
        if not (math.isfinite(clip) and clip > 0):
            raise CheckpointTensorError(f"calibration clip_ratio must be a positive finite number, got {clip}")
        try:
            folded = fold_inverse_transform(weight, left, right)
        except torch.linalg.LinAlgError as e:
            raise CheckpointTensorError(f"calibration left_trans/right_trans is singular ({e}); FlatQuant "
                                        "transforms must be invertible.") from e  # fmt: skip
        tensors = {**self.quantize_inner(folded), "left_trans": left, "clip_ratio": torch.tensor([clip])}
        if right is not None:
            tensors["right_trans"] = right
        return tensors

    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> Runtime:
        actual = copy.copy(self)
        vars(actual).update(self.checkpoint_options(tensors, layer))
        return KernelLinearScheme.process_weights(actual, tensors, layer=layer)

    def kernel_options(self) -> dict[str, Any]:
        return {"left_dim": self.left_dim}

    def canonicalize(self, tensors: Mapping[str, torch.Tensor], layer: str) -> dict[str, Any]:
        out: dict[str, Any] = self.canonicalize_inner(tensors, layer)
        for name in ("left_trans", "right_trans"):
            if name in tensors:
                out[name] = check_scale(tensors[name], name, layer, positive=False)
        out["clip_ratio"] = check_scale(tensors["clip_ratio"], "clip_ratio", layer).item()
        return out
