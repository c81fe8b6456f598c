"""The supervisor: owns the process tree, its lifecycle and (next) config reloads."""
