"""The bundled inference engine: a small Llama-family model runner whose Triton
kernels are batch-invariant, so that a request's logprobs do not depend on the
batch it runs in.

Where things live:
    kernels/     the ops, one file per kernel (Triton) plus torch's own ops as "default"
    config.py    Hugging Face config.json -> ModelConfig (Llama, Mistral, Qwen2, Qwen3)
    loader.py    safetensors weights from a local folder (never a hub)
    model.py     the transformer, reading top to bottom
    tokenizer.py tokenizer.json + chat template
    engine.py    batching, KV cache, greedy and seeded sampling, logprobs
    models/tiny  the bundled tiny model (made by train_tiny.py)
"""
