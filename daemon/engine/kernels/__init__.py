"""Compiled kernels of the engine (cpu.py: built at install, loaded through ctypes)."""
