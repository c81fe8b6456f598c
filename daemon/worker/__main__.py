"""Entry point of a worker process: python -m daemon.worker INDEX"""

from daemon.tier import guard

guard()  # before importing torch: a second of imports is a second of outliving a dead supervisor

import os  # noqa: E402
import sys  # noqa: E402

from daemon.tier import BESIDE_VAR, EXIT_NO_ROOM_BESIDE, EXIT_REGROUP, start_tier  # noqa: E402

# Logging is set up before torch is imported: what torch warns about while it loads (a missing
# numpy, a CUDA driver it cannot use) becomes a log line, not raw text in a JSON log.
tier = start_tier("worker", int(sys.argv[1]) if len(sys.argv) > 1 else 0)

import structlog  # noqa: E402

from daemon.worker.allocator import keep_freed_memory  # noqa: E402

# before the model allocates anything: see allocator.py
tuned_allocator = keep_freed_memory()

from daemon.engine.demo_model import DemoModelError  # noqa: E402
from daemon.engine.model_dir import ModelDirError  # noqa: E402
from daemon.engine.models.registry import UnsupportedModel  # noqa: E402
from daemon.engine.parallel import ParallelError  # noqa: E402
from daemon.worker.memory import CacheAllocationFailed, NoRoomBeside  # noqa: E402
from daemon.worker.node_worker import NodeWorker  # noqa: E402
from daemon.worker.nodes import NodeRefused  # noqa: E402
from daemon.worker.service import WorkerService  # noqa: E402
from daemon.worker.tensor_group import EXIT_RANK_LOST, GroupBroken  # noqa: E402

log = structlog.get_logger("daemon.worker")
if not tuned_allocator:
    log.info("worker.allocator_untuned", detail="the C library has no mallopt: engine steps may run slower")
# Over several nodes a group that ends ends on every node: each node's worker starts again to
# form the next one, which is no crash of its own (a rank lost on this node still is).
group_ended = EXIT_REGROUP if tier.settings.distributed.nnodes > 1 else EXIT_RANK_LOST
try:
    if tier.settings.distributed.node_rank > 0:
        service = NodeWorker(tier)
    else:
        service = WorkerService(tier, beside=os.environ.get(BESIDE_VAR) == "1")
except (NodeRefused, GroupBroken) as exc:  # a node's worker that node 0 refused, or could not reach
    log.error("worker.not_joined", error=str(exc))
    raise SystemExit(EXIT_REGROUP) from None
except (ModelDirError, UnsupportedModel, DemoModelError, CacheAllocationFailed, ParallelError) as exc:
    log.error("worker.load_failed", error=str(exc))
    raise SystemExit(2) from None
except NoRoomBeside as exc:
    log.warning("worker.no_room_beside", detail=str(exc))
    raise SystemExit(EXIT_NO_ROOM_BESIDE) from None
try:
    service.run()
except GroupBroken as exc:  # the supervisor restarts the worker, and with it the whole group
    log.error("worker.group_broken", error=str(exc))
    raise SystemExit(group_ended) from None
