"""OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

A thin translation layer: `protocol.py` (request/response models, conversion to the native
`GenerateParameters`), `chat_template.py` (messages -> prompt), `serving.py` (runs the choices
through the same `Validator` and `Infer` as the native API) and `routes.py` (the handlers).
"""
