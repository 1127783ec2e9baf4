"""Strict parsing of upstream config dicts (diffusers / transformers config.json, scheduler configs)
into frozen dataclasses: every key is a field, metadata, ignored on purpose, or refused.

Shared by the model configs (jaxdiff.models.configs) and the scheduler config (jaxdiff.schedules).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxdiff.errors import ConfigError

# Keys that describe the file, not the numbers.
METADATA_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values",
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "_attn_implementation_autoset",
})


def parse_config(cls, raw: Mapping[str, Any], *, source: str, ignored: frozenset[str] = frozenset(),
                 only_values: Mapping[str, tuple] = None, renames: Mapping[str, str] = None):
    """Build the config dataclass `cls` from an upstream config dict.

    Args:
      cls: a frozen dataclass whose fields use the upstream key names (or `renames` maps them).
      raw: the parsed config.json.
      source: file path for error messages.
      ignored: extra keys that do not affect numerics for this model.
      only_values: upstream key -> tuple of accepted values (what jaxdiff implements); other values
        raise ConfigError.
      renames: upstream key -> field name.
    """
    only_values = only_values or {}
    renames = renames or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = renames.get(key, key)
        if key in only_values:
            if freeze(value) not in [freeze(v) for v in only_values[key]]:
                raise ConfigError(
                    f"{source}: {key}={value!r} is not supported by jaxdiff "
                    f"(supported: {', '.join(repr(v) for v in only_values[key])})")
            if name not in fields:
                continue
        if name in fields:
            kwargs[name] = freeze(value)
        elif key in METADATA_KEYS or key in ignored:
            continue
        else:
            raise ConfigError(f"{source}: unknown config key {key!r}; jaxdiff refuses options it does "
                              f"not implement rather than ignore them")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def freeze(value):
    """Lists become tuples so configs stay hashable (they are static arguments to jit)."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value
