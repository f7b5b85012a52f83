"""Compression passes (quantize, prune, lowrank, distill, lora) driven by recipes; the package itself is the verb.

``slimswarm.compress(model, "w4g128-gptq", tokenizer=tok)`` runs a recipe (a preset name, a YAML path or a Recipe)
on ``model`` in place and returns each pass's metadata, as torchao's ``quantize_(model, config)`` does for one pass.
"""

from __future__ import annotations

import sys
import types


def compress(model, recipe, calib=None, tokenizer=None, text=None) -> dict:
    """Run ``recipe`` on ``model`` in place. Calibration tokens [samples, seq_len] are built from the training-split
    text (or ``text``) when the recipe needs them and ``tokenizer`` is given."""
    from .recipe import Recipe, apply_recipe, load_recipe

    r = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    if r.needs_calibration and calib is None and tokenizer is not None:
        from .calibrate import calibration_batch

        calib = calibration_batch(tokenizer, text, r.calibration.samples, r.calibration.seq_len)
    return apply_recipe(model, r, calib, tokenizer=tokenizer, text=text)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
