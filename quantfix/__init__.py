"""quantfix: diagnose, plan, requantize and verify quantized LLMs in a closed loop."""

__version__ = "0.1.0"
