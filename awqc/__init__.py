"""awqc: AWQ int4 compiler backend on Apache TVM."""
