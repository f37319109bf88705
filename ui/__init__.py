"""The Gradio app's parts: preflight checks, Hub push and zip, rendering of job state, and the two tabs."""
