"""Entry point of a worker process: python -m daemon.worker INDEX"""

from daemon.tier import guard

guard()  # before importing torch: a second of imports is a second of outliving a dead supervisor

import sys  # noqa: E402

import structlog  # noqa: E402

from daemon.engine.demo_model import DemoModelError  # noqa: E402
from daemon.engine.llama import UnsupportedModel  # noqa: E402
from daemon.engine.model_dir import ModelDirError  # noqa: E402
from daemon.tier import start_tier  # noqa: E402
from daemon.worker.service import WorkerService  # noqa: E402

tier = start_tier("worker", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
try:
    service = WorkerService(tier)
except (ModelDirError, UnsupportedModel, DemoModelError) as exc:
    structlog.get_logger("daemon.worker").error("worker.load_failed", error=str(exc))
    raise SystemExit(2) from None
service.run()
