"""The inference engine: a library with no knowledge of processes, sockets or the supervisor.

Importing this package must stay cheap: modules that need torch import it themselves.
"""
