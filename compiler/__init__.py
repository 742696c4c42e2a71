"""Model import, calibration, pipeline and artifact writing (the compile side)."""
