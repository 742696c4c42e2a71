"""Per-target TIR schedules for the kernels awqc emits."""
