"""Entry point of a tokenizer worker process: python -m daemon.tokenizer INDEX"""

from daemon.tier import guard

guard()

import sys  # noqa: E402

from daemon.tokenizer.service import main  # noqa: E402

main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
