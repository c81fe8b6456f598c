"""daemon: a declarative, config-driven LLM serving daemon with hot reload."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("daemon")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
