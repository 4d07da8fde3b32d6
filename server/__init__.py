"""The HTTP layer over pyllama4.Engine: the OpenAI-compatible (and SGLang-native) server.

`server.cli` is the command line (`pyllama4-serve`, `pyllama4 serve`,
`python -m pyllama4.launch_server`); `server.app` is the ASGI app it serves with hypercorn.
"""
