"""Vision encoders: registry, ONNX export + check, TensorRT builds, runtimes."""

# One line per encoder module: importing it registers its `Encoder` in `encoder.ENCODERS`.
from vlmbuild.vision import intern_vit  # noqa: F401
from vlmbuild.vision import qwen_vit  # noqa: F401
