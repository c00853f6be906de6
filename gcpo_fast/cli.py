"""Command-line errors of the gcpo_fast commands: one line on stderr, exit status 2 for a usage error
(a bad argument) and 1 for a failure while running.

    from gcpo_fast.cli import ArgumentParser

    ap = ArgumentParser(prog="python -m gcpo_fast.eval", description=...)
    args = ap.parse_args(argv)        # a malformed flag: "python -m gcpo_fast.eval: error: ... (see --help)", exit 2
    ap.fail("--top_k must be >= 0")   # exit 2
    ap.fail("cannot load the weights: ...", status=1)
"""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints its usage block (several lines) before the error; --help has it
        self.fail(f"{message} (see --help)")

    def fail(self, message: str, status: int = 2):
        self.exit(status, f"{self.prog}: error: {message}\n")
