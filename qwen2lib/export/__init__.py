"""The hand-off (notebook 06): GGUF for llama.cpp and compressed-tensors for vLLM / SGLang, each written, read back
and checked against the package it came from."""
