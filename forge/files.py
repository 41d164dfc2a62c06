"""Files another stage reads: written whole or not at all, read back with their provenance checked.

A crash leaves the old file or the new one, never half of one (`atomic_path`); the files of one
transcoder export share one export id, so a crash mid-export is refused on load instead of mixing
two saves; a cache or a CLT made from another model than the one given is refused by fingerprint.

An output folder is one unit: one run writes it at a time (`one_writer`: an flock, the leftovers of
a killed run removed), each file carries its run's id, and commit.json, written last, lists the
run id of every file the folder holds complete (`commit`); a reader checks a file against it
(`check_committed`), so a run killed halfway through a folder is refused, never mixed. A rerun
takes the files it rewrites off commit.json first (`uncommit`); viz.py's pages carry an id derived
from their inputs (`derived_run_id`), so that a rerun writes the same bytes.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import uuid

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

LOCK = ".lock"  # in a stage's --out while a run writes it (one_writer)
STAGES = {  # script -> the files that mark a folder as its output: no other stage writes there
    "cache.py": ("manifest.json",),
    "train.py": ("metrics.jsonl", "checkpoints"),
    "interp.py": ("features.jsonl",),
    "graph.py": ("graph-metadata.json",),
    "viz.py features": (),  # its pages mark nothing; it must not take another stage's commit.json
}
MANIFEST = "commit.json"  # the commit marker of an output folder (commit): the files and run ids


def umask():
    """The process's umask (os has no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~umask()  # what open() gives a new file; safetensors makes its files 0600


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`. On success the temporary file gets the umask's mode, is
    fsynced and renamed over `path`, and the directory fsynced: a crash leaves the old file or the
    new one, never half of one. On an exception the temporary file is removed; an OSError without a
    file name (a full disk arrives so from write()) gets `path`'s."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:
            raise OSError(e.errno, e.strerror, path) from e
        raise
    fsync_dir(os.path.dirname(path))


def fsync_dir(path):
    """Make a rename in directory `path` durable (POSIX: the directory entry is data of its own)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path or ".") from e
    finally:
        os.close(fd)


def write_json(path, obj, indent=1):
    """json.dump to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)


def read_json(path, fix):
    """The JSON object in `path`; a file that is not JSON is refused naming it and `fix`."""
    with open(path, "rb") as f:  # FileNotFoundError names it
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged or cut short, not JSON ({e}): {fix}") from None


def read_jsonl(path, fix):
    """Yield the objects of a JSON-lines file; a line that is not JSON (a file cut mid-line) is
    refused naming the file, its line and `fix`."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as e:
                cut = " (cut short: no newline)" * (not line.endswith(b"\n"))
                raise ValueError(f"{path} line {i} is not JSON{cut} ({e}): {fix}") from None


def disk_error(e, path):
    """A SafetensorError that wraps an I/O error ("... (os error 28)") -> that OSError, or None."""
    code = re.search(r"os error (\d+)", str(e))
    return None if code is None else OSError(int(code.group(1)), os.strerror(int(code[1])), path)


def save_safetensors(path, tensors, export_id=None, metadata=None):
    """tensors -> the safetensors file `path`, atomically, with its save's export id (if any) and
    `metadata` (a dict of strings)."""
    meta = dict(metadata or {}) | ({} if export_id is None else {"export_id": export_id})
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, meta or None)
        except SafetensorError as e:
            raise disk_error(e, path) or e


def read_export_file(path, name, export_id, rows, n_rows=None):
    """The tensors of {path}/{name}.safetensors, `rows` of the per-feature ones (which must have
    n_rows rows, the config's n_features, if given)."""
    file = os.path.join(path, f"{name}.safetensors")
    fix = "re-export it, e.g. python train.py --resume --out DIR"
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: the export in {path} is incomplete ({fix})")
    try:
        with safe_open(file, "pt") as f:
            found = (f.metadata() or {}).get("export_id")
            if export_id is not None and found != export_id:
                other = "comes from another save than the config in"
                raise ValueError(f"{file} {other} {path} (a crash during an export?): {fix}")
            whole = ("b_dec", "W_skip")  # one per layer, not per feature: every rank reads them
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                if n_rows is not None and not k.startswith(whole) and shape[0] != n_rows:
                    sizes = f"{k} has {shape[0]} features, its config.json says {n_rows}"
                    raise ValueError(f"{file}: {sizes} (a config of another transcoder?): {fix}")
            return {
                k: f.get_slice(k)[slice(None) if k.startswith(whole) else rows] for k in f.keys()
            }
    except SafetensorError as e:
        raise ValueError(f"{file} is damaged or cut short ({e}): {fix}") from None


def read_safetensors(path):
    """{name: tensor} of a safetensors file; a damaged or cut short one is refused by name."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged or cut short ({e}): restore or rewrite it") from None


def check_finite(tensors, where):
    """Refuse NaN or ±inf in any floating tensor of {name: tensor}. One sum each: a NaN or an inf
    anywhere makes it non-finite, and a sum is ~25x faster than isfinite(t).all() (no bool copy);
    only then are the values counted (a sum can also overflow on finite ones)."""
    for name, t in tensors.items():
        if not t.is_floating_point() or torch.isfinite(t.sum()):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            fix = "a diverged or damaged transcoder: retrain it or resume an earlier checkpoint"
            raise ValueError(f"{where}: tensor {name} holds {bad} NaN or infinite values ({fix})")


def transcoder_id(path):
    """The export id of the transcoder clt-forge saved in `path` (config.json, or circuit-tracer's
    config.yaml): what interp's and graph's outputs record of the CLT they describe, or None."""
    for name in ("config.json", "config.yaml"):
        config = os.path.join(path, name)
        if os.path.isfile(config):
            with open(config, "rb") as f:
                try:
                    saved = json.load(f)
                except ValueError:  # a YAML config.yaml: no id (the loaders judge the files)
                    return None
            saved = saved.get("clt_forge", saved) if isinstance(saved, dict) else {}
            return saved.get("export_id")
    return None


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


# -----------------------------------------------------------------------------
# an output folder as one unit: one writer, run ids, the manifest written last


def out_folder(out):
    """Create the output folder `out`; an --out that is a file is refused by name."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    os.makedirs(out, exist_ok=True)  # a symbolic-link loop: OSError ELOOP, named by run_main
    return out


@contextlib.contextmanager
def one_writer(out, script):
    """Hold an exclusive flock on {out}/.lock while the block runs: a second run into `out` is
    refused at once, naming this one's host and pid. The kernel drops a dead process's flock, so a
    killed run leaves no stale lock; the file is removed on the way out (and `out`, if this made
    it and it stays empty). Temporary files a killed run left in `out` are removed. Under torchrun
    only global rank 0 takes the lock; out=None takes none."""
    if out is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = not os.path.isdir(out)
    path = os.path.join(out_folder(out), LOCK)
    check_not_foreign(out, script)
    fd = lock(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{script} on host {socket.gethostname()}, pid {os.getpid()}".encode())
        for tmp in glob.glob(os.path.join(out, "*.tmp")) + glob.glob(os.path.join(out, "*/*.tmp")):
            os.remove(tmp)  # a killed run's: ours now, as the lock is
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # before the flock goes: see lock()
            os.remove(path)
        os.close(fd)
        if created and os.path.isdir(out) and not os.listdir(out):  # a refused run: no trace
            os.rmdir(out)


def check_not_foreign(out, script):
    """Refuse to write `script`'s outputs into a folder of another stage's (STAGES)."""
    for other, marks in STAGES.items():
        found = [m for m in marks if other != script and os.path.exists(os.path.join(out, m))]
        if script in STAGES and found:
            what = f"{other}'s output ({found[0]})"
            fix = f"{script} writes a folder of its own: choose another --out"
            raise ValueError(f"{out} holds {what}: {fix}")


def lock(path):
    """An fd of `path` holding its exclusive flock, or ValueError naming the holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace") or "another run"
            os.close(fd)
            fix = "wait until it ends, or choose another --out"
            folder = os.path.dirname(path)
            raise ValueError(f"{folder} is being written by {holder}: {fix}") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder removed the file as we opened it: take the new one


def new_run_id():
    return uuid.uuid4().hex


def derived_run_id(*parts):
    """A run id made from what the run reads (its inputs' run ids) and the flags that shape its
    files, not drawn at random: runs with one id write the same bytes, so their files cannot mix
    into something neither wrote, and a rerun rewrites its files byte for byte (viz.py's pages)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def read_manifest(folder):
    """{"files": {name: run id}, ...} of an output folder, or None if it has none."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    return read_json(path, f"delete it and rerun the stage that wrote {folder}")


def commit(folder, run_id, names, **info):
    """Write {folder}/commit.json, last: the files `names` are run_id's, complete. Files of
    earlier runs it listed stay listed (graph.py keeps one {slug}.json per prompt)."""
    files = (read_manifest(folder) or {}).get("files", {}) | {name: run_id for name in names}
    write_json(os.path.join(folder, MANIFEST), dict(run_id=run_id, files=files, **info))


def uncommit(folder, names=None):
    """Before a run rewrites the files `names` of `folder` (None: all of them), take them off its
    commit.json: a run killed halfway leaves them listed under no run, not under the old one."""
    path = os.path.join(folder, MANIFEST)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    if names is None:
        os.remove(path)
        fsync_dir(folder)
        return
    files = manifest.get("files", {})
    if any(name in files for name in names):
        manifest["files"] = {k: v for k, v in files.items() if k not in names}
        write_json(path, manifest)


def check_committed(path, run_id, rerun):
    """Refuse the file `path` (carrying run_id) unless its folder's manifest lists it with that
    id: a run killed while writing the folder left it. Files without a run id (written before run
    ids) pass. rerun: the command that writes the folder again."""
    if run_id is None:
        return
    folder, name = os.path.split(path)
    listed = ((read_manifest(folder) or {}).get("files") or {}).get(name)
    if listed != run_id:
        state = f"lists run {listed[:8]} for it" if listed else "does not list it"
        why = f"a run was killed while writing {folder or '.'}"
        msg = f"{path} is from run {run_id[:8]} but {MANIFEST} {state} ({why})"
        raise ValueError(f"{msg}: rerun `{rerun}`")
