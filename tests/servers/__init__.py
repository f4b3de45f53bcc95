"""Real servers that tests and benchmarks run on 127.0.0.1, and ``client.send``: one
request to them through the real OpenAI backend."""
