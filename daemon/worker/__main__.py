"""Entry point of a worker process: python -m daemon.worker INDEX"""

import sys

from daemon.tier import start_tier
from daemon.worker.service import WorkerService

tier = start_tier("worker", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
WorkerService(tier).run()
