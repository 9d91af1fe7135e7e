"""Parallel reads of model files for a fast cold start.

Contract:
- Importing this module imports only the standard library (no torch), so a process can start
  reading its weights before ``import torch`` (``prefetch``) and ``MuseTalkModels.load`` picks the
  reads up (``take``).
- ``Reader(workers=IO_WORKERS, chunk_bytes=CHUNK_BYTES)``: a pool of threads issuing
  ``os.preadv`` of ``chunk_bytes`` pieces; several files and several chunks of one file are in
  flight at once (network disks scale with queue depth). The GIL is released during each read.
  - ``read(path) -> ReadHandle``: the whole file into one anonymous, lazily zeroed ``mmap``
    buffer (no memset of gigabytes); ``handle.result()`` waits and returns the buffer.
  - ``warm(path) -> ReadHandle``: the file into the page cache only (into one shared, discarded
    sink buffer), for loaders that map the file themselves (``torch.load(mmap=True)``);
    ``result()`` returns ``None``.
  ``result()`` re-raises the first error of any chunk: ``OSError`` (unreadable) or
  ``ShortReadError`` (the file ended before the size it had when the read started). The caller
  turns it into the ``ModelsError`` naming the file.
- ``safetensors_from_buffer(buf) -> dict[str, torch.Tensor]``: parses the safetensors header
  and returns CPU tensors that are zero-copy views of ``buf`` (the tensors keep it alive); the
  checks are those of the safetensors library (header inside the file, known dtypes, each
  tensor's byte range matching its shape, ranges contiguous and covering the data exactly).
  A malformed file raises ``ValueError``. Imports torch on call.
- ``prefetch(models_dir, version="v15", dtype="fp16") / take(path)``: warm the manifest (below)
  and start the reads a later
  ``MuseTalkModels.load`` will need (the fast copy for ``dtype`` when current, else the
  original); ``take`` hands over an in-flight read of an unchanged file (size and mtime as
  when the read started) exactly once, else ``None``.
- Warm manifest (``manifest_path()``: ``$MUSETALK_WARM_MANIFEST``, else
  ``~/.cache/musetalk-job/warm-files.json``; ``MUSETALK_WARM_MANIFEST=0`` disables it):
  ``start_recording()`` + ``record_manifest()`` write the files this process opened through
  Python since (audit hook: ``.pyc``, dist-info metadata, configs), every loaded module's file,
  and the shared libraries it mapped with the ranges this process touched (``/proc/self/pagemap``),
  plus the metadata the import system touches without reading a file: each module's source file
  (``stat`` only: the import checks its mtime against the ``.pyc``) and each directory listed
  (``os.listdir``/``os.scandir``: the path finders' caches, ``importlib.metadata``), so their
  inodes and directory blocks are cached too. ``warm_manifest()`` starts all of it (reads into
  the page cache, ``stat``, ``listdir``) in parallel — by default in a helper process running
  this file (standard library only), so the thousands of small reads never take this process's
  GIL from its imports; ``wait_warmed()`` joins it — so that imports and ``dlopen`` (serial
  small reads, latency-bound on a network disk) hit the cache. A manifest of another environment
  (``sys.prefix`` + cache tag) or a vanished file is skipped; manifests written before the
  ``stat``/``dir`` entries existed still work.
- ``thread_counters() -> dict``: the calling thread's CPU seconds, major page faults, bytes read
  from disk and read syscalls (``/proc/thread-self``; only ``cpu_s`` where that is missing), for
  telling a CPU-bound step from one waiting on the disk.
- ``throughput(paths, workers)``: raw read speed of a set of files (for ``bench/cold_start.py``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

IO_WORKERS = int(os.environ.get("MUSETALK_LOAD_IO_THREADS", "16"))
CHUNK_BYTES = int(float(os.environ.get("MUSETALK_LOAD_CHUNK_MB", "8")) * (1 << 20))
MAX_SAFETENSORS_HEADER = 100 * (1 << 20)  # the safetensors library's own limit


class ShortReadError(OSError):
    """The file ended before the size it had when the read started (truncated under us)."""


class ReadHandle:
    """One file being read by a ``Reader``; ``result()`` waits for every chunk."""

    def __init__(self, path: Path, size: int, mtime_ns: int, buffer: Any, chunks: int, keep: bool) -> None:
        self.path = path
        self.size = size
        self.mtime_ns = mtime_ns
        self.keep = keep  # True: bytes kept in ``buffer``; False: page cache only
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._buffer = buffer
        self._left = chunks
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.fd: int | None = None
        if chunks == 0:
            self._finish()

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The buffer (``read``) or ``None`` (``warm``); re-raises the first chunk error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"reading {self.path} did not finish in {timeout}s")
        if self._error is not None:
            raise self._error
        return self._buffer if self.keep else None

    def cancel(self) -> None:
        """Skip the chunks not read yet (``result()`` then raises); for a read nobody will take."""
        with self._lock:
            if self._error is None and not self._done.is_set():
                self._error = OSError(f"reading {self.path} was cancelled")

    def _chunk_done(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self._error is not None:
            self._buffer = None
        self.finished = time.perf_counter()
        self._done.set()


class Reader:
    """A thread pool of positional reads; see the module docstring."""

    def __init__(self, workers: int | None = None, chunk_bytes: int | None = None) -> None:
        self.workers = max(1, workers or IO_WORKERS)
        self.chunk_bytes = max(1 << 16, chunk_bytes or CHUNK_BYTES)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="musetalk-read")
        self._sink_buf: memoryview | None = None
        self._sink_lock = threading.Lock()

    def _sink(self) -> memoryview:
        """One ``chunk_bytes`` buffer that every thread's page-cache-only reads land in (the
        bytes are discarded, so concurrent writes do not matter): memory stays ``chunk_bytes``."""
        if self._sink_buf is None:
            with self._sink_lock:
                if self._sink_buf is None:
                    self._sink_buf = memoryview(bytearray(self.chunk_bytes))
        return self._sink_buf

    def read(self, path: Path | str) -> ReadHandle:
        return self._start(Path(path), keep=True)

    def warm(self, path: Path | str, ranges: Sequence[tuple[int, int]] | None = None) -> ReadHandle:
        """Into the page cache only: the whole file, or the ``(offset, length)`` ``ranges``."""
        return self._start(Path(path), keep=False, ranges=ranges)

    def warm_pieces(self, path: str, ranges: Sequence[tuple[int, int]] | None = None) -> int:
        """Advisory warm-up: queue ``path`` (or its ``ranges``) in ``chunk_bytes`` pieces; each
        task opens the file itself (no syscall here), errors are ignored. Returns the pieces."""
        if ranges is None:
            ranges = [(0, -1)]  # the whole file, its size found by the task
        n = 0
        for start, length in ranges:
            if length < 0:
                self._pool.submit(self._warm_piece, path, start, -1)
                n += 1
                continue
            for off in range(start, start + length, self.chunk_bytes):
                self._pool.submit(self._warm_piece, path, off, min(self.chunk_bytes, start + length - off))
                n += 1
        return n

    def warm_meta(self, path: str, kind: str) -> None:
        """Advisory: ``kind`` "stat" (the inode) or "dir" (its listing) of ``path``, in the pool;
        errors are ignored."""
        self._pool.submit(_warm_meta, path, kind)

    def _warm_piece(self, path: str, off: int, length: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        try:
            scratch = self._sink()
            end = off + length if length >= 0 else os.fstat(fd).st_size
            while off < end:
                n = os.preadv(fd, [scratch[: min(len(scratch), end - off)]], off)
                if n <= 0:
                    break
                off += n
        except OSError:
            pass
        finally:
            os.close(fd)

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait)

    def _start(self, path: Path, keep: bool, ranges: Sequence[tuple[int, int]] | None = None) -> ReadHandle:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            size = st.st_size
            buffer: Any = (mmap.mmap(-1, size) if size else bytearray()) if keep else None
            pieces = []
            for start, length in ranges if ranges is not None else [(0, size)]:
                end = min(size, start + length)
                pieces += [(off, min(self.chunk_bytes, end - off)) for off in range(max(0, start), end, self.chunk_bytes)]
        except BaseException:
            os.close(fd)
            raise
        handle = ReadHandle(path, size, st.st_mtime_ns, buffer, len(pieces), keep)
        if not pieces:
            os.close(fd)
            return handle
        handle.fd = fd
        view = memoryview(buffer) if keep else None
        for off, length in pieces:
            self._pool.submit(self._chunk, handle, fd, view, off, length)
        return handle

    def _chunk(self, handle: ReadHandle, fd: int, view: memoryview | None, off: int, length: int) -> None:
        error: BaseException | None = None
        try:
            if handle._error is None:  # another chunk already failed: skip the work
                if view is not None:
                    _pread_into(fd, view[off : off + length], off, handle)
                else:
                    _pread_into(fd, self._sink()[:length], off, handle)
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            error = exc
        handle._chunk_done(error)


def _warm_meta(path: str, kind: str) -> None:
    try:
        if kind == "dir":
            os.listdir(path)
        else:
            os.stat(path)
    except OSError:
        pass


def _pread_into(fd: int, target: memoryview, offset: int, handle: ReadHandle) -> None:
    done = 0
    total = len(target)
    while done < total:
        n = os.preadv(fd, [target[done:]], offset + done)
        if n <= 0:
            raise ShortReadError(f"{handle.path}: file ended at byte {offset + done}, expected {handle.size} bytes")
        done += n


# ------------------------------------------------------------------------------------------
# safetensors from memory

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def safetensors_header(buf: Any) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors buffer; ``ValueError`` when malformed."""
    total = len(buf)
    if total < 8:
        raise ValueError(f"file is {total} bytes, shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_SAFETENSORS_HEADER or 8 + n > total:
        raise ValueError(f"header length {n} does not fit the {total}-byte file")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + n, header


def safetensors_from_buffer(buf: Any) -> dict[str, Any]:
    """Zero-copy CPU tensors of a safetensors file held in ``buf`` (a writable buffer)."""
    import torch

    start, header = safetensors_header(buf)
    data_len = len(buf) - start
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"tensor {name!r}: malformed header entry") from exc
        if dtype_name not in _DTYPES or not hasattr(torch, _DTYPES[dtype_name]):
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name!r}: malformed shape or offsets")
        entries.append((begin, end, name, getattr(torch, _DTYPES[dtype_name]), list(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    expected = 0
    for begin, end, name, _dtype, _shape in entries:
        if begin != expected or end < begin:
            raise ValueError(f"tensor {name!r}: data offsets [{begin}, {end}) are not contiguous (expected {expected})")
        expected = end
    if expected != data_len:
        raise ValueError(f"tensor data is {data_len} bytes but the header describes {expected}")
    out: dict[str, Any] = {}
    for begin, end, name, dtype, shape in entries:
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for d in shape:
            count *= d
        if count * itemsize != end - begin:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (start + begin) % itemsize == 0:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).view(shape)
        else:  # unaligned: a copy (files written by the safetensors library are aligned)
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=start + begin)
            out[name] = raw.clone().view(dtype).view(shape)
    return out


# ------------------------------------------------------------------------------------------
# Early prefetch (before ``import torch``) and hand-over to the loader

_READER: Reader | None = None
_INFLIGHT: dict[Path, ReadHandle] = {}
_LOCK = threading.Lock()


def shared_reader() -> Reader:
    """The process-wide reader (created on first use)."""
    with _LOCK:
        return _shared_reader_locked()


def _shared_reader_locked() -> Reader:
    global _READER
    if _READER is None:
        _READER = Reader()
    return _READER


def is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def start(path: Path, reader: Reader | None = None) -> ReadHandle:
    """``read`` for safetensors (parsed from memory), ``warm`` for everything else."""
    reader = reader or shared_reader()
    return reader.read(path) if is_safetensors(path) else reader.warm(path)


def take(path: Path) -> ReadHandle | None:
    """The in-flight ``prefetch`` read of ``path`` if the file is unchanged since; once."""
    with _LOCK:
        handle = _INFLIGHT.pop(Path(path).resolve(), None)
    if handle is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size != handle.size or st.st_mtime_ns != handle.mtime_ns:
        return None
    return handle


def planned_files(models_dir: Path | str, version: str = "v15", dtype: str | None = "fp16") -> list[Path]:
    """The weight files ``MuseTalkModels.load`` will read for ``version`` in ``dtype`` ("fp16",
    "bf16" or None for fp32), largest first. Stats only."""
    from ..weights import fast_copy_valid
    from . import layout

    models_dir = Path(models_dir)
    originals: list[tuple[str, Path | None]] = [
        (f"unet-{version}", layout.unet_paths(models_dir, version)[0]),
        ("vae", _first(models_dir / layout.VAE_DIR, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))),
        ("whisper-encoder", _first(models_dir / layout.WHISPER_DIR, ("model.safetensors", "pytorch_model.bin"))),
        ("bisenet", models_dir / layout.BISENET),
    ]
    out = []
    for key, original in originals:
        fast = models_dir / layout.FAST[key] if key in layout.FAST else None
        if dtype is not None and fast is not None and fast_copy_valid(models_dir, key, dtype=dtype):
            out.append(fast)
        elif original is not None and original.is_file():
            out.append(original)
    return out


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def prefetch(models_dir: Path | str, version: str = "v15", dtype: str | None = "fp16") -> list[Path]:
    """Start reading what ``load`` will need (see ``planned_files``); returns those paths.
    Never raises for a missing/unreadable file: ``load`` reports it."""
    started = []
    warm_manifest()
    try:
        paths = planned_files(models_dir, version, dtype)
    except Exception:  # noqa: BLE001 - the loader reports a broken dir properly
        return []
    for path in paths:
        try:
            handle = start(path)
        except OSError:
            continue
        with _LOCK:
            _INFLIGHT[path.resolve()] = handle
        started.append(path)
    return started


PREFETCH_ENV = "MUSETALK_PREFETCH"  # "0": the entry points neither warm early nor load early


def early_start_enabled() -> bool:
    """``MUSETALK_PREFETCH`` is not off: the entry points may start on the models before a job
    needs them (``warm_early``; ``musetalk-job run`` also loads them while the inputs download)."""
    return os.environ.get(PREFETCH_ENV, "1").strip().lower() not in {"0", "false", "off", "no"}


def warm_early() -> int:
    """What a CLI entry point calls before anything imports torch: ``warm_manifest()``, so the
    library files of the last load (torch's shared libraries, diffusers' and transformers'
    bytecode, the directories the imports list) come off the disk in the helper process while
    this one imports, instead of from when ``load`` starts. The weights are left to ``load``,
    which reads them while diffusers imports (CPU-bound): read from the start as well, they held
    back the imports' own reads and the process was ready later (bench/README.md, runs 50-51).
    Returns the entries started; 0 when ``MUSETALK_PREFETCH=0``, without a current manifest or
    when already warming. Never raises."""
    if not early_start_enabled():
        return 0
    try:
        return warm_manifest()
    except Exception:  # noqa: BLE001 - advisory
        return 0


def release_prefetched() -> int:
    """Cancel and forget the ``prefetch`` reads no load took (another dtype or version than
    guessed, or a job that failed before loading): their chunks not read yet are skipped and
    their buffers freed, so neither memory nor the interpreter's exit waits on them. Returns how
    many. ``load`` calls it."""
    with _LOCK:
        handles = list(_INFLIGHT.values())
        _INFLIGHT.clear()
    for handle in handles:
        handle.cancel()
    return len(handles)


# ------------------------------------------------------------------------------------------
# Warm manifest: the files a load imports and maps, warmed in parallel at the next cold start

WARM_ENV = "MUSETALK_WARM_MANIFEST"  # a path for the manifest, or "0" to neither read nor write one


def manifest_path() -> Path | None:
    """Where the warm manifest lives (``$MUSETALK_WARM_MANIFEST``, else the user cache dir)."""
    value = os.environ.get(WARM_ENV)
    if value == "0":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "musetalk-job" / "warm-files.json"


PACKAGE_MAP_ENV = "MUSETALK_PACKAGE_MAP"
_package_map_lock = threading.Lock()
_package_map_state: dict[str, Any] = {}


def package_map_path() -> Path | None:
    """Where ``cache_package_map`` keeps the map: beside the warm manifest (off with it, or with
    ``MUSETALK_PACKAGE_MAP=0``)."""
    if os.environ.get(PACKAGE_MAP_ENV) == "0":
        return None
    manifest = manifest_path()
    return None if manifest is None else manifest.with_name("package-map.json")


def _sys_path_fingerprint() -> list[list[Any]]:
    """Per ``sys.path`` entry, the names of the distribution metadata directories in it (names
    carry the version): what ``packages_distributions`` reads, without reading it."""
    out: list[list[Any]] = []
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as it:
                names = sorted(e.name for e in it if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:  # not a directory (a zip, a missing path): nothing the map could come from
            continue
        out.append([entry, names])
    return out


def cache_package_map() -> bool:
    """Serve ``importlib.metadata.packages_distributions()`` from a cache; True when installed.

    diffusers calls it while being imported (a scan of every installed distribution's metadata:
    0.3 s on the dev box, 0.7-1.2 s on the H200 VM's 201 distributions). The first call in a
    process reads the map saved by an earlier process when ``sys.path`` and the distributions in
    its directories are unchanged, else computes it and saves it (``package_map_path()``); later
    calls return a copy of it. Off when ``package_map_path()`` is None.
    """
    path = package_map_path()
    if path is None:
        return False
    import importlib.metadata as std_metadata

    with _package_map_lock:
        if _package_map_state.get("installed"):
            return True
        original = std_metadata.packages_distributions

        def packages_distributions() -> Mapping[str, list[str]]:
            with _package_map_lock:
                cached = _package_map_state.get("map")
                if cached is None:
                    cached = _package_map_state["map"] = _load_or_build_package_map(path, original)
            return {name: list(dists) for name, dists in cached.items()}

        std_metadata.packages_distributions = packages_distributions  # type: ignore[assignment]
        _package_map_state["installed"] = True
        _package_map_state["original"] = original
    return True


def _load_or_build_package_map(path: Path, build: Any) -> dict[str, list[str]]:
    key = {"env": _env_key(), "sys_path": _sys_path_fingerprint()}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key and isinstance(saved.get("map"), dict):
            return {str(k): [str(d) for d in v] for k, v in saved["map"].items()}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    built = {str(k): [str(d) for d in v] for k, v in build().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "map": built}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache dir only costs the next process the scan
    return built


def uncache_package_map() -> None:
    """Undo ``cache_package_map`` (tests)."""
    import importlib.metadata as std_metadata

    with _package_map_lock:
        original = _package_map_state.pop("original", None)
        if original is not None:
            std_metadata.packages_distributions = original  # type: ignore[assignment]
        _package_map_state.clear()


def _env_key() -> str:
    return f"{sys.prefix}|{sys.implementation.cache_tag}"


def _touched_ranges(gap: int = 1 << 20) -> dict[str, list[tuple[int, int]]]:
    """Per mapped shared library, the file ``(offset, length)`` ranges of the pages present in
    THIS process (``/proc/self/pagemap`` bit 63, readable without privileges), ``gap`` merged:
    what the process actually touched, whatever else happens to be in the page cache."""
    page = mmap.PAGESIZE
    pieces: dict[str, list[tuple[int, int]]] = {}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            maps = [line.split(None, 5) for line in fh]
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return {}
    try:
        for fields in maps:
            if len(fields) != 6:
                continue
            lib = fields[5].strip()
            if not lib.startswith("/") or ".so" not in os.path.basename(lib):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            try:
                raw = os.pread(pagemap, (hi - lo) // page * 8, lo // page * 8)
            except OSError:
                continue
            entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
            out = pieces.setdefault(lib, [])
            for i, entry in enumerate(entries):
                if entry >> 63:
                    out.append((offset + i * page, page))
    finally:
        os.close(pagemap)
    merged: dict[str, list[tuple[int, int]]] = {}
    for lib, items in pieces.items():
        items.sort()
        ranges: list[list[int]] = []
        for start, length in items:
            if ranges and start - (ranges[-1][0] + ranges[-1][1]) <= gap:
                ranges[-1][1] = max(ranges[-1][1], start + length - ranges[-1][0])
            else:
                ranges.append([start, length])
        merged[lib] = [(x, y) for x, y in ranges]
    return merged


def record_manifest(path: Path | None = None, exclude: Sequence[Path | str] = ()) -> Path | None:
    """Write the warm manifest of this process: the files it opened while recording, every
    loaded module's file (the ``.pyc`` when there is one) in import order, then every mapped
    shared library with the ranges of it this process touched.
    Files under ``exclude`` (the models dir: the loader reads those itself) are left out.
    Best effort (``None`` when it cannot be written); the write is atomic."""
    global _RECORDING
    path = path or manifest_path()
    if path is None:
        return None
    _RECORDING = False
    entries: list[dict[str, Any]] = []
    skip = ("/proc/", "/sys/", "/dev/", *(os.path.join(os.path.realpath(d), "") for d in exclude),
            *(os.path.join(os.path.abspath(d), "") for d in exclude))
    seen: set[str] = set()
    libs = _touched_ranges()  # shared libraries: only the touched ranges, never whole

    def keep(file: str) -> bool:
        return file not in seen and file not in libs and not file.startswith(skip) and not os.path.realpath(file).startswith(skip)

    def add_dir(folder: str) -> None:
        key = "dir:" + folder
        inside = os.path.join(folder, "").startswith(skip) or os.path.join(os.path.realpath(folder), "").startswith(skip)
        if folder and key not in seen and not inside and os.path.isdir(folder):
            seen.add(key)
            entries.append({"path": folder, "dir": True})

    for file, kind in list(_OPENED.items()):
        file = os.path.abspath(file)
        if kind == "dir":
            add_dir(file)
        elif keep(file) and os.path.isfile(file):
            seen.add(file)
            entries.append({"path": file})
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        cached = getattr(spec, "cached", None)
        file = cached or origin
        if not isinstance(file, str) or not os.path.isabs(file):
            continue
        # the import lists the package dir (path finder cache) and stats the source before
        # reading the .pyc: warm those inodes/blocks too, in import order
        if isinstance(origin, str) and os.path.isabs(origin):
            add_dir(os.path.dirname(origin))
            if cached and origin != cached and keep(origin) and os.path.isfile(origin):
                seen.add(origin)
                entries.append({"path": origin, "stat": True})
        if keep(file) and os.path.isfile(file):
            seen.add(file)
            entries.append({"path": file})
    for lib, ranges in libs.items():
        if lib not in seen and os.path.isfile(lib):
            seen.add(lib)
            entries.append({"path": lib, "ranges": ranges})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"env": _env_key(), "created": time.time(), "files": entries}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return None
    return path


_RECORDER: threading.Thread | None = None


def record_manifest_async(exclude: Sequence[Path | str] = ()) -> threading.Thread:
    """``record_manifest`` in a daemon thread (off the critical path; a process that exits
    first leaves no partial file); ``wait_recorded`` joins it."""
    global _RECORDER
    _RECORDER = threading.Thread(
        target=record_manifest, kwargs={"exclude": list(exclude)}, name="musetalk-record-manifest", daemon=True
    )
    _RECORDER.start()
    return _RECORDER


def wait_recorded(timeout: float | None = None) -> None:
    if _RECORDER is not None:
        _RECORDER.join(timeout)


def manifest_is_current(path: Path | None = None) -> bool:
    path = path or manifest_path()
    if path is None or not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("env") == _env_key()
    except (OSError, ValueError, AttributeError):
        return False


_WARMED: list[int] = []
WARM_PROCESS = os.environ.get("MUSETALK_WARM_PROCESS", "1") != "0"
_WARM_PROC: subprocess.Popen[bytes] | None = None


def _queue_entries(files: Sequence[Any], reader: Reader) -> int:
    """Queue the manifest entries on ``reader`` in order; returns how many were well-formed."""
    count = 0
    for entry in files:
        try:
            if entry.get("dir") or entry.get("stat"):
                reader.warm_meta(str(entry["path"]), "dir" if entry.get("dir") else "stat")
            else:
                ranges = [(int(a), int(b)) for a, b in entry["ranges"]] if "ranges" in entry else None
                reader.warm_pieces(str(entry["path"]), ranges)
            count += 1
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return count


def _well_formed(files: Sequence[Any]) -> int:
    """Entries with a path (cheap: the helper skips any whose ranges are malformed)."""
    return sum(1 for entry in files if isinstance(entry, dict) and "path" in entry)


def warm_manifest(path: Path | None = None, reader: Reader | None = None) -> int:
    """Start warming every entry of the manifest into the page cache (file contents, ``stat``
    inodes, directory listings), once per process, in recorded order; returns the entries
    started. Never raises: missing files, another environment's manifest or a broken manifest
    give nothing.

    Where: with ``reader``, on its threads (queued ahead of anything queued later). Otherwise,
    by default (``WARM_PROCESS``; ``MUSETALK_WARM_PROCESS=0`` turns it off), in a helper process
    (``python -I -S fastio.py --warm MANIFEST``, standard library only): its reads then never
    compete with this process's imports for the GIL (thousands of small reads would hand it over
    tens of thousands of times), and queueing costs this process one spawn instead of one task
    per entry. When the helper cannot be started: on the shared reader's threads."""
    global _MANIFEST_READER, _WARM_PROC
    path = path or manifest_path()
    with _LOCK:
        if _WARMED or path is None:
            return 0
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("env") != _env_key():
                return 0
            files = list(data["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0
        # only where sys.executable is a Python interpreter (not an embedding host)
        if reader is None and WARM_PROCESS and os.path.basename(sys.executable or "").startswith("python"):
            try:
                _WARM_PROC = subprocess.Popen(
                    [sys.executable, "-I", "-S", os.path.abspath(__file__), "--warm", str(path),
                     str(IO_WORKERS), str(CHUNK_BYTES)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                )
                count = _well_formed(files)
                _WARMED.append(count)
                return count
            except OSError:
                _WARM_PROC = None
        if _MANIFEST_READER is None:
            # the shared reader by default: its queue is FIFO, so these (needed first, by the
            # imports) go ahead of the weight chunks queued after them
            _MANIFEST_READER = reader or _shared_reader_locked()
        count = _queue_entries(files, _MANIFEST_READER)
        _WARMED.append(count)
        return count


def wait_warmed(timeout: float | None = None) -> int | None:
    """Wait for the warming helper process (if one was started); its exit code, else ``None``."""
    proc = _WARM_PROC
    if proc is None:
        return None
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _warm_main(argv: Sequence[str]) -> int:
    """The helper process: ``--warm MANIFEST WORKERS CHUNK_BYTES``; warms every entry, in order,
    and exits early when its parent exits (e.g. a bench run ended before the warming did)."""
    if len(argv) != 4 or argv[0] != "--warm":
        print("usage: fastio.py --warm MANIFEST WORKERS CHUNK_BYTES", file=sys.stderr)
        return 2
    try:
        files = list(json.loads(Path(argv[1]).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1
    parent = os.getppid()

    def watch_parent() -> None:  # warming for a process that is gone only disturbs the next one
        while True:
            time.sleep(0.05)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    reader = Reader(workers=int(argv[2]), chunk_bytes=int(argv[3]))
    try:
        _queue_entries(files, reader)
    finally:
        reader.shutdown(wait=True)
    return 0


# Files opened through Python (``open``/``os.open``/``io.open_code``: .pyc, dist-info METADATA
# read by importlib.metadata, configs, ...) and directories listed (path finders,
# importlib.metadata) while recording, via an audit hook: path -> "file" | "dir".
_OPENED: dict[str, str] = {}
_RECORDING = False
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDING or not args or not isinstance(args[0], str):
        return
    if event == "open":
        _OPENED.setdefault(args[0], "file")
    elif event in ("os.listdir", "os.scandir"):
        _OPENED.setdefault(args[0], "dir")


def start_recording() -> None:
    """Remember every file this process opens from now on (for ``record_manifest``)."""
    global _RECORDING, _HOOKED
    with _LOCK:
        if not _HOOKED:
            sys.addaudithook(_audit)  # cannot be removed; a flag check once disabled
            _HOOKED = True
        _RECORDING = True


_MANIFEST_READER: Reader | None = None


# ------------------------------------------------------------------------------------------
# Per-thread counters (what a step spent: CPU, page faults, disk reads)


def thread_counters() -> dict[str, float]:
    """The calling thread's ``cpu_s`` (user + system), ``majflt`` (major page faults: pages of a
    mapped file, e.g. a shared library, read from disk), ``read_bytes`` (bytes this thread made
    the kernel read from disk, page faults and readahead included) and ``syscr`` (read syscalls),
    from ``/proc/thread-self``. Only ``cpu_s`` where ``/proc`` is not available."""
    out: dict[str, float] = {"cpu_s": time.thread_time()}
    try:
        with open("/proc/thread-self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        out["majflt"] = float(fields[9])  # field 12 of proc(5), counted after "pid (comm)"
        with open("/proc/thread-self/io", "rb") as fh:
            io = dict(line.split(b": ", 1) for line in fh.read().splitlines() if b": " in line)
        out["read_bytes"] = float(io[b"read_bytes"])
        out["syscr"] = float(io[b"syscr"])
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return out


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` per key present in both (``cpu_s`` rounded to ms, counts as ints)."""
    return {k: round(after[k] - before[k], 3) if k == "cpu_s" else float(int(after[k] - before[k])) for k in before if k in after}


# ------------------------------------------------------------------------------------------
# Raw throughput (bench)


def throughput(paths: Iterable[Path | str], workers: int, chunk_bytes: int | None = None) -> dict[str, float]:
    """Read ``paths`` into the page cache with ``workers`` threads (1 = one thread, one file
    after another); ``{"bytes", "seconds", "gb_per_s"}``."""
    paths = [Path(p) for p in paths]
    total = sum(p.stat().st_size for p in paths)
    t0 = time.perf_counter()
    if workers <= 1:
        chunk = chunk_bytes or CHUNK_BYTES
        buf = memoryview(bytearray(chunk))
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                off = 0
                while True:
                    n = os.preadv(fd, [buf], off)
                    if n <= 0:
                        break
                    off += n
            finally:
                os.close(fd)
    else:
        reader = Reader(workers=workers, chunk_bytes=chunk_bytes)
        try:
            for h in [reader.warm(p) for p in paths]:
                h.result()
        finally:
            reader.shutdown(wait=True)
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": round(seconds, 3), "gb_per_s": round(total / 1e9 / seconds, 3) if seconds > 0 else 0.0}


if __name__ == "__main__":  # the warming helper process (``warm_manifest``)
    sys.exit(_warm_main(sys.argv[1:]))
