"""Inference (notebooks 05 and 06): one generation loop for every backend, chat in the model's template, continuous
batching, the OpenAI-compatible server and its benchmark client."""
