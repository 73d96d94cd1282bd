"""The unified normalization framework: fields, functions, layers, registry, sparsity.

Usable in any PyTorch model::

    from lit_divnorm.norm import build_norm, convert_norms
    norm = build_norm("dn*", 32, window=5, sigma=0.5, l1=0.005)
    convert_norms(torchvision_model, "dn*")  # every torch norm layer, in place
"""

from lit_divnorm.norm.convert import (
    LayoutAdapter,
    NormConversion,
    NormSource,
    convert_norms,
    describe_norm,
    register_norm_handler,
)
from lit_divnorm.norm.fields import PRESETS, Field, FieldSpec, parse_field
from lit_divnorm.norm.functional import box_mean, divisive_norm, field_mean
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.registry import (
    NormFactory,
    NormSpec,
    build_norm,
    list_norms,
    register_norm,
    resolve_norm,
)
from lit_divnorm.norm.sparsity import (
    clear_sparsity,
    record_sparsity,
    records_sparsity,
    sparsity_penalty,
)

__all__ = [
    "PRESETS",
    "DivisiveNorm",
    "Field",
    "FieldSpec",
    "LayoutAdapter",
    "NormConversion",
    "NormFactory",
    "NormSource",
    "NormSpec",
    "box_mean",
    "build_norm",
    "clear_sparsity",
    "convert_norms",
    "describe_norm",
    "divisive_norm",
    "field_mean",
    "list_norms",
    "parse_field",
    "record_sparsity",
    "records_sparsity",
    "register_norm",
    "register_norm_handler",
    "resolve_norm",
    "sparsity_penalty",
]
