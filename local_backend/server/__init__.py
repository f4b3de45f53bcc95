"""``detaudit serve``: the bundled engine behind an OpenAI-compatible HTTP API.

    app.py          routes, error bodies, body size limit and deadline, client disconnects
    protocol.py     OpenAI request validation and response JSON
    scheduler.py    async handlers <-> the engine's step thread; queue bound, timeouts, aborts
    connections.py  per-connection limits: open-connection bound, header deadline
    logs.py         rate-limited error logging
    main.py         uvicorn on one socket, clean shutdown on SIGTERM / Ctrl-C
"""
