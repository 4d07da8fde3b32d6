"""pyllama4.server: the HTTP layer over pyllama4.Engine, the OpenAI-compatible (and SGLang-native)
server.

The wheel installs this folder (server/ in the repository) as the `pyllama4.server` package, so
pyllama4 puts no other top-level name into site-packages. `pyllama4.server.cli` holds the command
line's entry points (`pyllama4-serve`, `pyllama4 serve`; `python -m pyllama4.launch_server`),
`flags` its flag table, `checks` what the flags may be on this machine, `model_source` where a
`--model-path` (a directory or a Hugging Face Hub id) lives here, and `launch` the server's
lifecycle;
`pyllama4.server.app` is the ASGI app it serves with hypercorn, wired from: `asgi` (bodies,
responses, errors, server-sent events), `router` (routing behind the API key and the request
limits of `http_limits`; `early_413` refuses oversized bodies from their headers),
`openai_routes` and `native_routes` (the endpoints), `serving` (the engine and options routes
share), `sampling` (request -> SamplingParams), `responses` (OpenAI response objects),
`chat_prompt`, `metrics` and `openapi`.
"""
