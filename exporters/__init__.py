"""Checkpoints -> subgraphs -> ONNX -> verify -> bundle, and the ``vlm2om`` CLI.

``families/`` registers the model families (``get_family``); ``core/`` is the export machinery,
``llm/`` the LLM kinds, ``verify/`` the checks against torch, ``ascend/`` the torch-free ATC side,
``cli/`` the commands.
"""
