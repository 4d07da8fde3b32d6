"""`python -m pyllama4.launch_server ...`: SGLang's spelling of `pyllama4-serve ...`.

The command-line entry point, above every other layer: it only hands over to pyllama4.server.
"""

from pyllama4.server.launch import main

if __name__ == "__main__":
    main()
