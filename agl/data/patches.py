"""Patch extraction (placeholder until implemented)."""
def extract_patches(*a, **k):
    raise NotImplementedError
