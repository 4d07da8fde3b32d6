"""`python -m pyllama4.launch_server ...`: SGLang's spelling of `pyllama4-serve ...`."""

from server.cli import main

if __name__ == "__main__":
    main()
