"""Relax passes: AWQ scaling and clipping, int4 lowering."""
