"""Model files: the one module that reads and writes them.

* :mod:`.files`     -- the only ``torch.load`` (``weights_only=True``), the checksum, the atomic writer;
* :mod:`.validate`  -- bounds of a config read from a file, checked before anything is built;
* :mod:`.kinds`     -- every kind of weights source (our weights file, training checkpoint, official detrex
  checkpoint, release zip, Hugging Face folder, pretrained name, Hub repo id) read the same way;
* :mod:`.registry`  -- the official pretrained models and ImageNet backbones by name;
* :mod:`.download`  -- download (resumable), cache and verification of registry files;
* :mod:`.hf`        -- the Hugging Face layout (``config.json`` + ``model.safetensors``).

Only :mod:`.files` is imported here (it needs torch alone), so low layers (backbones) can use it; the
other modules import the model and are imported where used.
"""

from .files import (CheckpointFormatError, UnsafePickleError, atomic_torch_save, atomic_write, file_sha256,
                    read_numpy_pickle, read_torch_file, remove_orphaned_temporaries, safe_load_pickle, tree_digest)

__all__ = ["CheckpointFormatError", "UnsafePickleError", "atomic_torch_save", "atomic_write", "file_sha256",
           "read_numpy_pickle", "read_torch_file", "remove_orphaned_temporaries", "safe_load_pickle", "tree_digest"]
