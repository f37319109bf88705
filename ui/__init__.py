"""The Gradio app's parts: Hub push and zip, rendering (job state, past runs, the preflight), and the two tabs."""
