"""Proof that a conversion is right: self-check, row check, verify, bench."""
