"""Where requests go: remote OpenAI-compatible APIs or the bundled local engine."""
