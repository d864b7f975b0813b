"""Stages of the alignment pipeline, the runner that does their bookkeeping, and what they share."""
