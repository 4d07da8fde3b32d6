"""The command line: `pyllama4-serve`, `pyllama4 serve` and `python -m pyllama4.launch_server`.

The flags are defined in pyllama4.server.flags, checked in pyllama4.server.checks; the server's
lifecycle is pyllama4.server.launch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyllama4.server.flags import PROG, OneLineParser
from pyllama4.server.launch import main


def serve_main() -> None:
    """`pyllama4-serve ...`"""
    main(prog=PROG)


def pyllama4_main(argv: Sequence[str] | None = None) -> None:
    """`pyllama4 COMMAND ...`; the one command so far is `serve`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        main(argv[1:], prog="pyllama4 serve")
        return
    from pyllama4 import __version__

    parser = OneLineParser(prog="pyllama4", description="pyllama4: a Llama 4 serving engine.")
    parser.add_argument("--version", action="version", version=f"pyllama4 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "serve",
        help="serve a model over the OpenAI API (pyllama4 serve --help lists its flags)",
        add_help=False,
    )
    parser.parse_args(argv)  # "serve" was handled above: only help, --version and errors remain


if __name__ == "__main__":
    serve_main()
