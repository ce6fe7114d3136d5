"""Import this module to register the plugin's train spec (``model.name = "upipe_llama3"``).

The spec is defined in :mod:`torchtitan_upipe.titan.train_spec`.
"""

from .titan.train_spec import MODEL_NAME, get_train_spec, register

__all__ = ["MODEL_NAME", "get_train_spec", "register"]
