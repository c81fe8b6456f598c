"""Entry point of the scheduler process: python -m daemon.scheduler"""

from daemon.scheduler.service import SchedulerService
from daemon.tier import start_tier

SchedulerService(start_tier("scheduler")).run()
