"""Run Triton kernels on the CPU with Triton's interpreter (TRITON_INTERPRET=1), for tests.

The interpreter of Triton 3.x converts 1-element tensors with ``int(array)``, which numpy >= 2
refuses for non-0-d arrays; ``enable()`` patches that one conversion. Import this before the
kernels are first used, with TRITON_INTERPRET=1 set before triton is imported.
"""
from __future__ import annotations

import numpy as np


def enable() -> bool:
    try:
        import triton.runtime.interpreter as ti
    except ImportError:
        return False
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None:       # another Triton layout: the caller reports it
        return False
    if getattr(orig, "_cachegen_patched", False):
        return True

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._cachegen_patched = True
    ti._patch_lang_tensor = patched
    return True
