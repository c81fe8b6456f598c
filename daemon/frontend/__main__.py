"""Entry point of the front-end tier process: python -m daemon.frontend"""

from daemon.tier import guard

guard()

from daemon.frontend.server import main  # noqa: E402

main()
