"""llama.cpp as quantfix's GGUF engine: a pinned CPU build of its tools (``tools``), ctypes bindings
to its quantizers (``ggml``), its importance-matrix file (``imatrix``), GGUF conversion
(``convert``) and the ``llama-quantize`` / ``llama-perplexity`` runners (``run``).

Everything here points down only: it uses ``quantfix.errors`` and takes the cache dir as an argument.
"""
