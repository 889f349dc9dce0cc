"""Run a function through torch.compile when asked, with the eager form as the fallback."""

from __future__ import annotations

import warnings

import torch


class MaybeCompiled:
    """A function run through torch.compile when asked, else eagerly; if
    compiling or running the compiled form fails (no Triton, an unsupported
    op), it warns once and stays eager, which computes the same."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False

    def __call__(self, use_compile: bool, *args):
        if use_compile and not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                with warnings.catch_warnings():  # inductor's note on how it fused a softmax: not the user's concern
                    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled")
                    return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any failure: the eager form is the reference
                self.failed = True
                warnings.warn(f"torch.compile of {self.fn.__name__} failed, running it eagerly: {e}")
        return self.fn(*args)
