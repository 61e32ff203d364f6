"""Serving over HTTP: the agent's own /predict API and the Open Inference Protocol v2 on one port.

- `server`: the asyncio server (connections, body budget, deadlines).
- `protocol`: HTTP/1.1 request heads in, whole responses out (no I/O).
- `routes`: what each path answers; every route ends in `Agent.predict` or `Agent.feed_labels`.
- `oip`: the /v2/... routes (KServe v2, Triton HTTP).
- `jsonio`: JSON in and out (orjson when installed, else the stdlib).
"""
