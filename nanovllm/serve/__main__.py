"""`python -m nanovllm.serve [MODEL] [options]`, the same as `nanovllm serve`."""
from nanovllm.serve.cli import serve

serve()
