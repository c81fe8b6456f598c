"""Entry point of the scheduler process: python -m daemon.scheduler"""

from daemon.tier import guard

guard()

from daemon.scheduler.service import SchedulerService  # noqa: E402
from daemon.tier import start_tier  # noqa: E402

SchedulerService(start_tier("scheduler")).run()
