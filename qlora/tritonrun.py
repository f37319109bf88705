"""Launching the fused layer's own Triton kernels: on a card where one cannot run (no Triton for it, a compile error),
the caller's fallback from then on, said once in the log."""
from __future__ import annotations

import logging

from .errors import brief


def launch(failed: list, what: str, instead: str, run):
    """run(): launches the kernel and returns its result. None once the kernel failed on this process's card (`failed`
    holds the reason; the first failure is logged as "the <what> did not run (<why>); <instead>")."""
    import torch

    if failed:
        return None
    try:
        return run()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # no Triton for this card, a compile error
        failed.append(e)
        logging.getLogger("qlora").warning("speed: the %s did not run (%s); %s", what, brief(e), instead)
        return None
