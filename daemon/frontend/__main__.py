"""Entry point of the front-end tier process: python -m daemon.frontend"""

from daemon.frontend.server import main

main()
