"""Data: the synthetic captioned shapes world."""
