"""Entry point of a tensor-parallel rank other than 0: python -m daemon.worker.follower RANK REPLICA

Started by rank 0 (tensor_group.Followers), never by the supervisor: it loads its share of the
model, joins the group and runs the steps rank 0 broadcasts, until the group ends.
"""

from daemon.tier import guard

if __name__ == "__main__":
    guard()  # dies with rank 0 (its spawner) and with the supervisor

import os  # noqa: E402
import sys  # noqa: E402

from daemon.tier import start_tier  # noqa: E402


def main() -> None:
    rank = int(sys.argv[1])
    tier = start_tier("worker", int(sys.argv[2]))  # its replica's worker tier, in its log lines
    import structlog

    from daemon.worker.allocator import keep_freed_memory

    keep_freed_memory()
    from daemon.engine.parallel import join_group, leave_group
    from daemon.tier import EXIT_REGROUP
    from daemon.worker.service import load_runner
    from daemon.worker.tensor_group import COLLECTIVE_TIMEOUT_S, GROUP_VAR, device_type, follow, meeting_place

    log = structlog.get_logger("daemon.worker").bind(rank=rank)
    settings = tier.settings
    meeting = meeting_place(os.environ[GROUP_VAR], rank)
    parallel = join_group(
        rank, settings.model.tp_size, meeting, device_type=device_type(settings), timeout_s=COLLECTIVE_TIMEOUT_S
    )
    try:
        runner, _loaded = load_runner(settings, parallel=parallel)
        log.info("worker.rank_ready", pid=os.getpid(), device=str(runner.device))
    except Exception as exc:  # noqa: BLE001 - the group ends either way; say why first
        log.error("worker.rank_failed", error=f"{type(exc).__name__}: {exc}")
        leave_group(parallel)
        raise SystemExit(1) from None
    try:
        follow(parallel, runner)
    except Exception as exc:  # noqa: BLE001 - a collective failed: some rank, here or on another node, is gone
        log.warning("worker.group_ended", error=f"{type(exc).__name__}: {exc}")
        raise SystemExit(EXIT_REGROUP) from None
    finally:
        leave_group(parallel)


if __name__ == "__main__":
    main()
