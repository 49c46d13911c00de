"""VLMo (microsoft/unilm ``vlmo/``), in progress: the checkpoint reader (``checkpoint.py``) over
graphs/vlmo.py's encoders and the VQA answer table (``answers.py``). The family's recipe, its classification pipeline and the ``vqa`` and
``retrieve`` commands are still to come, so it is not registered in ``FAMILIES``."""
