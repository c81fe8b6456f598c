"""Entry point of a worker process: python -m daemon.worker INDEX"""

import sys

import structlog

from daemon.engine.demo_model import DemoModelError
from daemon.engine.llama import UnsupportedModel
from daemon.engine.model_dir import ModelDirError
from daemon.tier import start_tier
from daemon.worker.service import WorkerService

tier = start_tier("worker", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
try:
    service = WorkerService(tier)
except (ModelDirError, UnsupportedModel, DemoModelError) as exc:
    structlog.get_logger("daemon.worker").error("worker.load_failed", error=str(exc))
    raise SystemExit(2) from None
service.run()
