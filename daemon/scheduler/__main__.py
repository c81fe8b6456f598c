"""Entry point of the scheduler process: python -m daemon.scheduler"""

from daemon.tier import guard

guard()

from daemon.tier import start_tier  # noqa: E402

tier = start_tier("scheduler")  # logging first: warnings raised by the imports below are log lines

from daemon.scheduler.service import SchedulerService  # noqa: E402

SchedulerService(tier).run()
