"""Before a model is allocated, the config read from a file must agree with the tensors that file holds.

A hostile or corrupt config (a GGUF header, a config.json, a slimswarm.json) could otherwise ask for any number of
layers or any width: the model is first built on the meta device, which costs no memory, and its tensor shapes
are compared with the file's; only then is real memory taken, and never more than the file's tensors need.
"""

from __future__ import annotations

import re

import torch

from ..errors import SlimswarmError

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def check_layer_count(num_layers: int, keys, source: str) -> None:
    """The config's layer count must be the number of decoder layers the weights hold (checked before building
    any module: a config claiming 2^31 layers would otherwise spend hours constructing them)."""
    ids = {int(m.group(1)) for k in keys if (m := _LAYER.match(k))}
    held = max(ids) + 1 if ids else 0
    if num_layers != held or len(ids) != held:
        raise SlimswarmError(f"{source}: the config says {num_layers} layers, the weights hold "
                             f"{len(ids)} (numbered up to {held - 1})")


def check_shapes(skeleton: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor ``skeleton`` (a model on the meta device) expects that the file holds must have its shape."""
    for name, t in skeleton.state_dict().items():
        got = sd.get(name)
        if got is None:
            continue
        if tuple(got.shape) != tuple(t.shape):
            raise SlimswarmError(f"{source}: tensor {name} has shape {list(got.shape)} in the file, the config "
                                 f"implies {list(t.shape)}")
        if got.is_floating_point() != t.is_floating_point():
            raise SlimswarmError(f"{source}: tensor {name} is {str(got.dtype)[6:]} in the file, the model needs "
                                 f"{'a float' if t.is_floating_point() else 'an integer'} type")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def header_shapes(st) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes and dtypes an open safetensors file declares, read from its header only."""
    out = {}
    for k in st.keys():
        sl = st.get_slice(k)
        out[k] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.uint8), device="meta")
    return out
