"""QLoRA fine-tuning of a chat model, and side-by-side chat with the base and the adapter.

Importing this package loads no model and imports neither torch nor gradio; the heavy parts load on first use.
"""
import logging

from .config import EMBEDDED_MODEL, SAMPLE_DATASET, GenerationSettings, TrainConfig, embedded_defaults
from .events import JobState

__all__ = ["EMBEDDED_MODEL", "SAMPLE_DATASET", "GenerationSettings", "JobState", "TrainConfig", "embedded_defaults"]

# Before any module imports bitsandbytes (it warns at import): on a CPU with AVX512-BF16 and without the optional
# `kernels` package (a Hub download) it says once per process that it uses its own 4-bit kernel instead. True, and
# nothing a user can act on, in the app and the CLI alike.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
