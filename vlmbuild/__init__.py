"""vlmbuild: InternVL2 / Qwen-VL-Chat checkpoints → TensorRT(-LLM) engines → OpenAI-compatible server."""

__version__ = "0.1.0"
