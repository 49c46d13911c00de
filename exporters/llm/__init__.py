"""The LLM kinds, each a decoder spec: what its embed and decoder-group graphs take and return
(every tensor with its runtime role), example inputs per gear for tracing and verification,
the KV-cache layout recorded in the manifest, the attention kind, the tokenizer entry, and its
reference forward (a whole sequence, no cache) for the torch reference and the golden trace.

``llama.LlamaSpec`` is the Llama (Vicuna) kind; ChatGLM and InternLM2 are added beside it, each
a file of its own over ``common``. A family picks its kind; the export core and the runtime
never branch on it.
"""
