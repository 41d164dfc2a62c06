"""Corpus readers: a corpus name -> its documents (strings), read lazily, in a fixed order.

    "toy"                   the toy world's documents (toyworld.toy_corpus), endless
    a .txt file             documents separated by <|endoftext|>, read in 1 MB blocks
    a .jsonl / .json file   one string or object per line / a JSON list of them (read whole)
    a .parquet file         one column, a row-group batch at a time (pyarrow)
    a folder                its .txt, .jsonl and .parquet files, sorted by path
    hf:NAME[:config][:split]  a Hugging Face dataset, streamed (split defaults to train)

`text_field` names the field or column of the text. Bad input raises ValueError naming the file,
the line (or row) and the fix. The order is fixed: a cache built from a corpus resumes the same.
"""

import itertools
import json
import os
import sys

from forge import toyworld
from forge.hub import ENDOFTEXT

TOY_CHUNK = 1000  # the toy corpus is drawn in chunks of this many documents, each with its own seed
FOLDER_FILES = (".txt", ".jsonl", ".parquet")  # not .json: folders hold metadata in .json files


def iter_documents(corpus, seed=0, text_field="text"):
    """Yield the document strings of a corpus (see the module docstring); seed: the toy corpus's."""
    if corpus == "toy":
        for chunk in range(sys.maxsize):  # endless: the writer stops when it has enough tokens
            yield from toyworld.toy_corpus(TOY_CHUNK, seed * 1_000_003 + chunk)
    elif corpus.startswith("hf:"):
        yield from _hf_documents(corpus, text_field)
    elif os.path.isdir(corpus):
        files = [os.path.join(r, f) for r, _, fs in os.walk(corpus) for f in fs]
        files = sorted(f for f in files if f.endswith(FOLDER_FILES))
        if not files:
            none = "holds no .txt, .jsonl or .parquet file: pass a folder that does"
            raise ValueError(f"corpus folder {corpus} {none}")
        for path in files:
            yield from _file_documents(path, text_field)
    elif not os.path.isfile(corpus):
        kinds = "a .txt, .jsonl, .json or .parquet file, a folder of them, hf:NAME or 'toy'"
        raise FileNotFoundError(f"corpus {corpus} does not exist ({kinds})")
    else:
        yield from _file_documents(corpus, text_field)


def _file_documents(path, text_field):
    """The documents of one file, read by its suffix; invalid UTF-8 names its first bad line."""
    readers = {".jsonl": _jsonl_documents, ".json": _json_documents, ".parquet": _parquet_documents}
    try:
        yield from readers.get(os.path.splitext(path)[1], _text_documents)(path, text_field)
    except UnicodeDecodeError:
        with open(path, "rb") as f:  # line by line: a newline byte is never inside a character
            for i, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    where = f"{path} line {i}: invalid UTF-8 (byte 0x{line[e.start]:02x})"
                    raise ValueError(f"{where}: re-encode the file as UTF-8") from None
        raise ValueError(f"{path}: invalid UTF-8: re-encode the file as UTF-8") from None


def _text_documents(path, text_field, block=1 << 20):
    """Documents separated by <|endoftext|>, read in 1 MB blocks (files may be huge)."""
    with open(path, encoding="utf-8") as f:
        tail = ""
        while block_text := f.read(block):
            *docs, tail = (tail + block_text).split(ENDOFTEXT)
            yield from (d for d in docs if d.strip())
        if tail.strip():
            yield tail


def _jsonl_documents(path, text_field):
    """One JSON object (or string) per line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad = f"{path} line {i}: not valid JSON ({e.msg}, column {e.colno})"
                raise ValueError(f"{bad}: fix or delete that line") from None
            yield _text_of(row, text_field, f"{path} line {i}")


def _json_documents(path, text_field):
    """A JSON list of strings or objects, read whole: a corpus larger than memory is a .jsonl."""
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            bad = f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
            raise ValueError(f"{bad}: fix the file") from None
    if not isinstance(rows, list):
        what = f"{path} holds a JSON {type(rows).__name__}, not a list of documents"
        fix = f"pass a JSON list of strings or of objects with a {text_field!r} field (or a .jsonl)"
        raise ValueError(f"{what}: {fix}")
    yield from (_text_of(row, text_field, f"{path} item {i}") for i, row in enumerate(rows))


def _parquet_documents(path, text_field):
    """The text column, one row-group batch at a time (pyarrow, imported only here)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs the pyarrow package: pip install pyarrow") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: the file is not parquet
        fix = "pass a parquet file or another corpus"
        raise ValueError(f"{path}: not a readable parquet file ({e}): {fix}") from None
    if text_field not in f.schema_arrow.names:
        fix = f"(columns {f.schema_arrow.names}): pass --text-field COLUMN"
        raise ValueError(f"{path} has no column {text_field!r} {fix}")
    batches = f.iter_batches(batch_size=1024, columns=[text_field])
    for row, text in enumerate(t for batch in batches for t in batch.column(0).to_pylist()):
        if not isinstance(text, str):
            where = f"{path} row {row}: column {text_field!r}"
            fix = "drop such rows or pass --text-field COLUMN"
            raise ValueError(f"{where} holds {text!r}, not a string: {fix}")
        yield text


def _hf_documents(corpus, text_field):
    """Stream hf:NAME[:config][:split] with the datasets package (imported only here): NAME is a hub
    id or a local folder of data files. A resume streams it again from its start."""
    name, config, split = (corpus[3:].split(":") + ["", ""])[:3]
    try:
        import datasets
    except ImportError:
        fix = "pip install datasets (or pass a local .parquet / .jsonl file)"
        raise ValueError(f"--corpus {corpus} needs the datasets package: {fix}") from None
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # offline, no such dataset / config / split: datasets raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = "check NAME[:config][:split] and the network (offline: local folders, cached data)"
        dataset = f"the Hugging Face dataset of --corpus {corpus} ({first})"
        raise ValueError(f"cannot open {dataset}: {fix}") from None
    yield from (_text_of(row, text_field, f"{corpus} row {i}") for i, row in enumerate(stream))


def _text_of(row, text_field, where):
    """The text of one record: the record itself if it is a string, else its text field."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return row[text_field]
    keys = f" (fields {sorted(row)[:8]})" if isinstance(row, dict) else ""
    expected = f"expected a string or an object with a string {text_field!r} field{keys}"
    raise ValueError(f"{where}: {expected}: pass --text-field NAME")


def contexts_from(pack, enc, cfg, doc, token, step):
    """A streaming DP rank's contexts: documents doc, doc + step, doc + 2·step, ... of cfg.corpus
    (the others read and skipped), packed by pack (cache.iter_contexts) from token `token` of the
    first on. Yield (tokens (ctx,), the cursor after them): the (document, token) to start from to
    get the contexts that follow. The corpus running out is refused, naming the fix."""
    docs = itertools.islice(iter_documents(cfg.corpus, cfg.seed, cfg.text_field), doc, None, step)
    rel = 0  # the document of the last token yielded, counted in this rank's documents
    for tokens, ids in pack(docs, enc, cfg.ctx, token):
        last = int(ids[-1])
        n = int((ids[1:] == last).sum())  # that document's tokens in this context
        token = token + n if last == rel else n
        rel = last
        yield tokens, (doc + rel * step, token)
    fix = "pass a larger corpus or fewer --steps, or train from a cache (its reader repeats)"
    raise ValueError(f"corpus {cfg.corpus} ran out for a DP rank (document {doc} on): {fix}")
