"""Stage 3, quantization (notebook 03): the deploy package's own ``quantize()`` run with stage 2's statistics, one
decoder layer at a time, and the fidelity of what it wrote."""
