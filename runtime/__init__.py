"""Artifact runtime: TVM runtime + numpy + tokenizers only."""
