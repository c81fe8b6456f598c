"""One file per model family, each a composition of daemon.engine.layers; registry.py maps HF
architecture names to them. Importing this package stays cheap: registry.py needs no torch."""
