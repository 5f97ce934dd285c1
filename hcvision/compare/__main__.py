import sys

from ..cli import run_cli
from .cli import PROG, main

sys.exit(run_cli(main, prog=PROG))
