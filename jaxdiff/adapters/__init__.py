"""Adapters on the inference side: LoRA / LyCORIS maths (lora.py) and files applied to params trees
(files.py). Loading a LoRA needs nothing from jaxdiff.training, which imports the maths from here."""
from jaxdiff.adapters.files import (AdapterSet, LoraAdapter, LoraFileError, apply, from_state_dict,
                                    module_names, read_lora_file)
from jaxdiff.adapters.lora import apply_unmerged, factors, merge, target_modules

__all__ = ["AdapterSet", "LoraAdapter", "LoraFileError", "apply", "apply_unmerged", "factors",
           "from_state_dict", "merge", "module_names", "read_lora_file", "target_modules"]
