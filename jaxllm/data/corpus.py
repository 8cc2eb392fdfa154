"""Text corpora written once to ArrayRecord files: the embedded stdlib corpus or a user folder.

The embedded corpus "stdlib" is the `.py` source of the running interpreter's standard library
(no `site-packages`/`dist-packages`): every machine with Python has it, so nothing is downloaded.
A user folder is any directory of text files. Each file is one document. A file belongs to the
"validation" split iff sha256(its relative path) mod 10_000 < val_fraction * 10_000, so the split
depends on neither listing order nor machine.

`prepare_corpus` writes each split once to `<cache>/<source>-<fingerprint>/<split>.array_record`
(one record per document: its text as UTF-8) plus a `manifest.json`, and returns their paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

STDLIB = "stdlib"
SPLITS = ("train", "validation")
DEFAULT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the on-disk layout changes, so stale caches are not reused
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """`cache_dir`, else env JAXLLM_CACHE, else ~/.cache/jaxllm."""
  root = cache_dir or os.environ.get("JAXLLM_CACHE") or "~/.cache/jaxllm"
  return Path(root).expanduser().resolve()


def source_root(source: str) -> Path:
  """The directory a source reads from: the stdlib directory, or the user's folder."""
  if source == STDLIB:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()
  root = Path(source).expanduser().resolve()
  if not root.is_dir():
    raise FileNotFoundError(
      f"data source {source!r}: folder {root} does not exist; set DataConfig.source to "
      f'"{STDLIB}" or to an existing folder of text files'
    )
  return root


def list_files(source: str, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> list[str]:
  """Sorted posix paths, relative to `source_root(source)`, of the source's documents.

  The stdlib source takes `.py` files only. Hidden files and folders, `__pycache__`,
  `site-packages` and `dist-packages` are skipped.
  """
  root = source_root(source)
  suffixes = (".py",) if source == STDLIB else tuple(extensions)
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
    rel = Path(folder).relative_to(root)
    found += [(rel / f).as_posix() for f in files if f.endswith(suffixes) and not f.startswith(".")]
  if not found:
    raise ValueError(
      f"data source {source!r}: folder {root} holds no files ending in {', '.join(suffixes)}; "
      "add text files there or change DataConfig.extensions"
    )
  return sorted(found)


def split_of(relpath: str, val_fraction: float) -> str:
  """"validation" or "train" for the document at `relpath`, by a stable hash of the path."""
  bucket = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 10_000
  return "validation" if bucket < round(val_fraction * 10_000) else "train"


def split_files(relpaths: list[str], val_fraction: float) -> dict[str, list[str]]:
  """`relpaths` grouped by split, each list keeping the input order."""
  _check_fraction(val_fraction)
  out = {split: [] for split in SPLITS}
  for rel in relpaths:
    out[split_of(rel, val_fraction)].append(rel)
  return out


def _check_fraction(val_fraction: float) -> None:
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1, e.g. 0.05")


def _fingerprint(root: Path, relpaths: list[str], val_fraction: float) -> str:
  """Hash of everything the written records depend on: paths, sizes, mtimes, the split rule."""
  h = hashlib.sha256(f"{_FORMAT}|{root}|{val_fraction!r}".encode())
  for rel in relpaths:
    st = (root / rel).stat()
    h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def corpus_dir(
  source: str = STDLIB,
  cache_dir: str | None = None,
  val_fraction: float = 0.05,
  extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
) -> Path:
  """Where `prepare_corpus` keeps (or would keep) this source's records."""
  _check_fraction(val_fraction)
  root, relpaths = source_root(source), list_files(source, extensions)
  name = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}" if source == STDLIB else root.name
  return cache_root(cache_dir) / f"{name}-{_fingerprint(root, relpaths, val_fraction)}"


def _read_text(path: Path) -> bytes:
  return path.read_bytes().decode("utf-8", errors="replace").encode("utf-8")


def _write(source: str, val_fraction: float, extensions: tuple[str, ...], out: Path) -> None:
  root, relpaths = source_root(source), list_files(source, extensions)
  manifest = dict(source=source, root=str(root), val_fraction=val_fraction,
                  extensions=list(extensions), format=_FORMAT, splits={})
  for split, files in split_files(relpaths, val_fraction).items():
    writer, total = ArrayRecordWriter(str(out / f"{split}.array_record"), "group_size:1"), 0
    try:
      for rel in tqdm(files, desc=f"writing {split} split of {source}", unit="file", leave=False):
        record = _read_text(root / rel)
        writer.write(record)
        total += len(record)
    finally:
      writer.close()
    manifest["splits"][split] = dict(records=[f"{split}.array_record"], files=files,
                                     num_docs=len(files), bytes=total)
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def prepare_corpus(
  source: str = STDLIB,
  cache_dir: str | None = None,
  val_fraction: float = 0.05,
  extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
) -> dict[str, list[str]]:
  """Writes the source's splits to ArrayRecord files once; returns split -> record paths.

  The files go to a temporary folder that is renamed into place when complete, so an
  interrupted run never leaves a half-written cache, and concurrent writers do not collide.
  """
  final = corpus_dir(source, cache_dir, val_fraction, tuple(extensions))
  if not (final / MANIFEST).is_file():
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable by all
    try:
      _write(source, val_fraction, tuple(extensions), tmp)
      os.rename(tmp, final)
    except OSError:
      if not (final / MANIFEST).is_file():  # not just another process finishing first
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  manifest = read_manifest(final)
  return {split: [str(final / r) for r in manifest["splits"][split]["records"]] for split in SPLITS}


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a prepared corpus, given its folder or one of its record files."""
  path = Path(path)
  folder = path if path.is_dir() else path.parent
  try:
    return json.loads((folder / MANIFEST).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"could not read {folder / MANIFEST} ({e}); delete {folder} and run "
                     "prepare_corpus again") from e
