"""Files another stage reads: written whole or not at all, read back with their provenance checked.

A crash leaves the old file or the new one, never half of one (`atomic_path`); the files of one
transcoder export share one export id, so a crash mid-export is refused on load instead of mixing
two saves; a cache or a CLT made from another model than the one given is refused by fingerprint.
"""

import contextlib
import json
import os

from safetensors import safe_open
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`. On success the temporary file is fsynced and renamed
    over `path`, and the directory fsynced: a crash leaves the old file or the new one, never half
    of one. On an exception the temporary file is removed."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def fsync_dir(path):
    """Make a rename in directory `path` durable (POSIX: the directory entry is data of its own)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj, indent=1):
    """json.dump to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)


def save_safetensors(path, tensors, export_id=None):
    """tensors -> the safetensors file `path`, atomically, with its save's export id (if any)."""
    metadata = None if export_id is None else {"export_id": export_id}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def read_export_file(path, name, export_id, rows):
    """The tensors of {path}/{name}.safetensors, `rows` of the per-feature ones."""
    file = os.path.join(path, f"{name}.safetensors")
    fix = "re-export it, e.g. python train.py --resume --out DIR"
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: the export in {path} is incomplete ({fix})")
    with safe_open(file, "pt") as f:
        found = (f.metadata() or {}).get("export_id")
        if export_id is not None and found != export_id:
            other = "comes from another save than the config in"
            raise ValueError(f"{file} {other} {path} (a crash during an export?): {fix}")
        whole = ("b_dec", "W_skip")  # one per layer, not per feature: every rank reads them whole
        return {k: f.get_slice(k)[slice(None) if k.startswith(whole) else rows] for k in f.keys()}


def check_same_model(model, sha256, what):
    """Refuse `what` (a cache, a CLT) made from another model than `model`: sha256 is the
    fingerprint recorded when it was made ("" for files from before fingerprints: let through)."""
    if not sha256:
        return
    found = model.fingerprint()
    if found != sha256:
        name = getattr(model, "name_or_path", "this model")
        ids = f"sha256 {sha256[:12]}…, this model {found[:12]}…"
        fix = "pass the --model it was made from, or rebuild it for this one"
        raise ValueError(f"{what} was made from another model than {name} ({ids}): {fix}")
