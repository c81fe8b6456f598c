"""Entry point of a tokenizer worker process: python -m daemon.tokenizer INDEX"""

from daemon.tier import guard

guard()

import sys  # noqa: E402

from daemon.tier import start_tier  # noqa: E402

# Logging first: warnings raised by the imports below (tokenizers, jinja2) are log lines.
tier = start_tier("tokenizer", int(sys.argv[1]) if len(sys.argv) > 1 else 0)

from daemon.tokenizer.service import main  # noqa: E402

main(tier)
