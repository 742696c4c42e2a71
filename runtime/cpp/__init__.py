"""The C++ runner for devices without Python, and its cross-build helper."""
