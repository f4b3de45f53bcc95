"""``detaudit serve``: the bundled engine behind an OpenAI-compatible HTTP API.

    app.py        routes, error bodies, body size limit
    protocol.py   OpenAI request validation and response JSON
    scheduler.py  async handlers <-> the engine's step thread; queue bound, timeouts
    main.py       uvicorn on one socket, clean shutdown on SIGTERM / Ctrl-C
"""
