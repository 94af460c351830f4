"""Stage 2, calibration (notebook 02): calibration text in its published layouts, and per-channel activation
statistics of every Linear's input, measured with the deploy package's own code."""
