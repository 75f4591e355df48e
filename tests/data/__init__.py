"""Data that ships with the tests (the synthetic correction task of the training tests)."""
