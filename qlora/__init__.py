"""QLoRA fine-tuning of a chat model, and side-by-side chat with the base and the adapter.

Importing this package loads no model and imports neither torch nor gradio; the heavy parts load on first use.
"""
from .config import EMBEDDED_MODEL, SAMPLE_DATASET, GenerationSettings, TrainConfig, embedded_defaults
from .events import JobState

__all__ = ["EMBEDDED_MODEL", "SAMPLE_DATASET", "GenerationSettings", "JobState", "TrainConfig", "embedded_defaults"]
