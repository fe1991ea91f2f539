"""``register_scheme`` / ``get_scheme``: the (quant type, layer kind) -> scheme class registry."""

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from quant_core.errors import SchemeRegistrationError, UnsupportedSchemeError
from quant_core.quant_types import LAYER_KINDS, MODELSLIM_QUANT_TYPES
from quant_core.schemes.base import SCHEME_BASES, Scheme

S = TypeVar("S", bound=type[Scheme])


class SchemeRegistry:
    """Maps ``(quant_type, layer_kind)`` to a scheme class. quant-core keeps one default instance."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, str], type[Scheme]] = {}

    def register(self, quant_type: str, layer_kind: str) -> Callable[[S], S]:
        """Class decorator: serve ``quant_type`` layers of ``layer_kind`` with the decorated class."""
        if layer_kind not in LAYER_KINDS:
            raise SchemeRegistrationError(
                f"cannot register {quant_type!r} for layer kind {layer_kind!r}: use one of {', '.join(LAYER_KINDS)}."
            )
        if not isinstance(quant_type, str) or not quant_type:
            raise SchemeRegistrationError(f"quant_type must be a non-empty string, got {quant_type!r}")

        def decorate(cls: S) -> S:
            base = SCHEME_BASES[layer_kind]
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise SchemeRegistrationError(
                    f"{getattr(cls, '__name__', cls)!r} registered for ({quant_type}, {layer_kind}) must "
                    f"subclass {base.__name__}."
                )
            existing = self._classes.get((quant_type, layer_kind))
            if existing is not None:
                raise SchemeRegistrationError(
                    f"({quant_type}, {layer_kind}) is already served by {existing.__module__}.{existing.__qualname__}; "
                    f"refusing to register {cls.__module__}.{cls.__qualname__} as well."
                )
            self._classes[(quant_type, layer_kind)] = cls
            return cls

        return decorate

    def scheme_class(self, quant_type: str, layer_kind: str) -> type[Scheme]:
        """The class registered for the pair; raises :class:`UnsupportedSchemeError` listing what exists."""
        cls = self._classes.get((quant_type, layer_kind))
        if cls is None:
            raise UnsupportedSchemeError(self._unsupported_message(quant_type, layer_kind))
        return cls

    def get(self, quant_type: str, layer_kind: str, **options: Any) -> Scheme:
        """An instance of the scheme for the pair, built with ``options`` (``backend``, ``version``, ...)."""
        cls = self.scheme_class(quant_type, layer_kind)
        accepted = _accepted_options(cls)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise UnsupportedSchemeError(
                f"{cls.__qualname__} ({quant_type}, {layer_kind}) does not take these options: "
                f"{', '.join(unknown)}. It accepts: {', '.join(sorted(accepted))}."
            )
        return cls(**options)

    def accepted_options(self, quant_type: str, layer_kind: str) -> set[str]:
        """The option names ``get(quant_type, layer_kind, **options)`` accepts."""
        return _accepted_options(self.scheme_class(quant_type, layer_kind))

    def supported(self, layer_kind: str | None = None) -> list[tuple[str, str]]:
        """Every registered ``(quant_type, layer_kind)``, sorted; only one kind's when ``layer_kind`` is given."""
        return sorted(k for k in self._classes if layer_kind is None or k[1] == layer_kind)

    def __contains__(self, pair: object) -> bool:
        return pair in self._classes

    def _unsupported_message(self, quant_type: str, layer_kind: str) -> str:
        if layer_kind not in LAYER_KINDS:
            return f"unknown layer kind {layer_kind!r}; use one of {', '.join(LAYER_KINDS)}."
        same_kind = [q for q, k in self.supported(layer_kind)]
        lines = [
            f"No {layer_kind} scheme for quant type {quant_type!r}.",
            f"Supported for {layer_kind} layers: {', '.join(same_kind) or '(none)'}.",
        ]
        other_kinds = [k for q, k in self.supported() if q == quant_type]
        if other_kinds:
            lines.append(f"{quant_type!r} is registered for: {', '.join(other_kinds)} layers.")
        if quant_type not in MODELSLIM_QUANT_TYPES:
            known = sorted(MODELSLIM_QUANT_TYPES | {q for q, _ in self.supported()})
            guess = difflib.get_close_matches(quant_type.upper(), known, n=1)
            lines.append(
                f"{quant_type!r} is not a type msModelSlim writes"
                + (f"; did you mean {guess[0]!r}?" if guess else ".")
                + " Old MindIE-format descriptions use other names: re-export with msModelSlim or quant-core."
            )
        else:
            lines.append(
                "msModelSlim can write this type but quant-core does not implement it for this layer kind; "
                "re-quantize the layer with a supported scheme or open an issue."
            )
        return "\n".join(lines)


def _accepted_options(cls: type) -> set[str]:
    """Keyword options of ``cls.__init__``, following ``**kwargs`` that are passed on to the parent class."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


DEFAULT_REGISTRY = SchemeRegistry()
register_scheme = DEFAULT_REGISTRY.register
get_scheme = DEFAULT_REGISTRY.get
scheme_class = DEFAULT_REGISTRY.scheme_class
accepted_options = DEFAULT_REGISTRY.accepted_options
supported_schemes = DEFAULT_REGISTRY.supported
