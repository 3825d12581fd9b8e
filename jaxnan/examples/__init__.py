"""Runnable examples shipped with jaxnan (``python -m jaxnan demo``).

Code here is written the way a user writes a training script, and jaxnan's
source attribution treats it as user code (not as library code).
"""
