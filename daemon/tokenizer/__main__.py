"""Entry point of a tokenizer worker process: python -m daemon.tokenizer INDEX"""

import sys

from daemon.tokenizer.service import main

main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
