"""What a GGUF file's header says (gguf-py's reader), checked: a file that is not a GGUF, or is cut short, is a
clear error here, before llama.cpp is asked to load it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError

MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type_name: str  # GGML type, e.g. Q4_K
    shape: tuple[int, ...]
    elements: int
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    file_bytes: int
    architecture: str
    block_count: int | None
    file_type: int | None
    tensors: tuple[GgufTensor, ...]
    metadata: dict[str, object]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(t.elements for t in self.tensors)

    def parameters_by_type(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for t in self.tensors:
            counts[t.type_name] += t.elements
        return dict(counts.most_common())

    def has_mtp(self) -> bool:
        return bool(self.metadata.get(f"{self.architecture}.nextn_predict_layers"))


def read_header(path: str | Path) -> GgufHeader:
    path = Path(path)
    if not path.is_file():
        raise QuantlabError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != MAGIC:
        raise QuantlabError(f"{path}: not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    try:
        reader = _checked_reader()(path)
    except ImportError:
        raise QuantlabError("reading GGUF headers needs the gguf package: pip install 'quantlab[gguf]'") from None
    except _Truncated as cut:
        raise QuantlabError(f"{path}: truncated: its header places data up to byte {cut.end:,} at least, the file has "
                            f"{size:,} bytes") from None
    except Exception as exc:  # gguf-py raises ValueError, IndexError, struct errors on a damaged header
        raise QuantlabError(f"{path}: a damaged GGUF header ({type(exc).__name__}: {str(exc)[:200]})") from None
    tensors = tuple(GgufTensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_elements),
                               int(t.n_bytes)) for t in reader.tensors)
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise QuantlabError(f"{path}: truncated: its header places tensor data up to byte {end:,}, the file has "
                            f"{size:,} bytes")
    metadata = {name: _value(field) for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    arch = str(metadata.get("general.architecture", "unknown"))
    return GgufHeader(path, size, arch, _int(metadata.get(f"{arch}.block_count")), _int(metadata.get("general.file_type")),
                      tensors, metadata)


class _Truncated(Exception):
    def __init__(self, end: int):
        super().__init__(end)
        self.end = end


def _checked_reader():
    """gguf-py's reader, refusing to read past the end of the file (it would slice short and fail to reshape)."""
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            import numpy as np

            end = int(offset) + int(np.empty([], dtype=dtype).itemsize) * int(count)
            if end > len(self.data):
                raise _Truncated(end)
            return super()._get(offset, dtype, count, override_order)

    return CheckedReader


def _value(field) -> object:
    try:
        value = field.contents()
    except Exception:  # an unusual field type: its name is still worth keeping
        return None
    return value if not isinstance(value, list) or len(value) <= 64 else f"[{len(value)} values]"


def header_model_name(header: GgufHeader) -> str | None:
    """The model a GGUF says it holds, as llama.cpp's converter names it from the checkpoint's id
    (general.basename, size_label and finetune: Qwen/Qwen3.6-27B -> Qwen3.6-27B); None when it does not say."""
    meta = header.metadata
    parts = [meta.get("general.basename"), meta.get("general.size_label"), meta.get("general.finetune")]
    if not isinstance(parts[0], str) or not isinstance(parts[1], str):
        return None
    return "-".join(p for p in parts if isinstance(p, str) and p)[:200]


def header_file_type(header: GgufHeader) -> str:
    """general.file_type by llama.cpp's name for it (gguf-py's LlamaFileType, e.g. 15 -> Q4_K_M)."""
    if header.file_type is None:
        return "of unstated type"
    try:
        from gguf import LlamaFileType

        kind = LlamaFileType(header.file_type & ~1024)  # 1024: the converter guessed the type
        return kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, ValueError):
        return f"file type {header.file_type}"


def _int(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None
