"""Entry point of the front-end tier process: python -m daemon.frontend"""

from daemon.tier import guard

guard()

from daemon.tier import start_tier  # noqa: E402

# Logging first: warnings raised by the imports below (Granian) are log lines. Granian drains on
# SIGTERM, so this tier keeps its signals.
tier = start_tier("frontend", stopped_by_supervisor=False)

from daemon.frontend.server import main  # noqa: E402

main(tier)
