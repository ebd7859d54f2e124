"""Inputs read from an ``.npz`` file, with errors that name the file and the array."""

from __future__ import annotations

import zipfile

import numpy as np

from .failures import CommandError

INPUTS_ARRAY = "inputs"
# What older files (and ``expunge train`` data sets) call the same array.
FALLBACK_ARRAY = "features"


def read_inputs(path: str) -> np.ndarray:
    """The ``inputs`` array (else ``features``) of the ``.npz`` at ``path`` as float32
    ``(n, *input_shape)``; a ``CommandError`` (usage) naming the file otherwise."""
    key = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CommandError(f"{path}: a single array (.npy), not an .npz archive")
        with loaded as data:
            key = next((k for k in (INPUTS_ARRAY, FALLBACK_ARRAY) if k in data.files), None)
            if key is None:
                has = ", ".join(sorted(data.files)) or "no arrays"
                raise CommandError(f"{path}: no array '{INPUTS_ARRAY}' (has: {has})")
            array = data[key]
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{path}: a directory, not an .npz file") from None
    except PermissionError:
        raise CommandError(f"{path}: permission denied") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CommandError(f"{path}: not a readable .npz archive ({exc})") from None
    except ValueError as exc:
        if key is not None and "Object arrays" in str(exc):
            raise CommandError(
                f"{path}: array '{key}' holds Python objects (pickle), which are refused; "
                "save numbers"
            ) from None
        raise CommandError(f"{path}: not an .npz archive (numpy.savez writes one)") from None
    if array.ndim < 1:
        raise CommandError(f"{path}: array '{key}' is a scalar; expected (n, *input_shape)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise CommandError(f"{path}: array '{key}' holds {array.dtype}, not numbers")
    return np.asarray(array, dtype=np.float32)
