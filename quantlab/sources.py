"""Where a model's weights come from: the bundled model (as shipped, or transformed: made on first use and cached),
a local folder, the Hub, random weights of a config's shapes, or a GGUF file (its header read as the config).
`resolve(spec)` returns a ModelSource: its config, name and location, where its files are, its tokenizer, a
fingerprint for caches, and its instance on the meta device. This is the only module that tells them apart;
everything after it asks the source.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from quantlab import bundled, cache_shapes
from quantlab.checkpoint import check_config_sizes, check_folder, compare_with_model, read_config, shard_files
from quantlab.errors import QuantlabError, summary
from quantlab.hf_loading import hub_unavailable_message, select_variant  # noqa: F401  (sources' own names too)
from quantlab.known_models import KNOWN_MODELS, known_by_hub_id, known_config_dir
from quantlab.llamacpp.gguf_file import GgufHeader, header_file_type, read_header
from quantlab.llamacpp.header_config import header_config
from quantlab.made_sources import MadeModel
from quantlab.placement import recover_interrupted_replace
from quantlab.schema.build import built_from

if TYPE_CHECKING:
    import torch

    from quantlab.model_spec import ModelSpec

HUB_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([^/]+)")  # the Hugging Face cache's layout


@dataclass(frozen=True)
class ModelSource:
    """One recipe's model source, resolved before any weights load."""

    spec: ModelSpec
    config: PretrainedConfig  # the whole checkpoint's config (the VL config for Qwen3.6-27B)
    name: str  # display name, e.g. "Qwen3.6-27B"
    location: str  # Hub id, folder, or the config behind synthetic weights
    notes: tuple[str, ...] = ()

    @property
    def synthetic(self) -> bool:
        return self.spec.source == "synthetic"

    @property
    def from_hub(self) -> bool:
        return self.spec.source == "hub"

    @property
    def weights(self) -> str:
        return "synthetic" if self.synthetic else "real"

    @property
    def hub_id(self) -> str | None:
        """The Hub repository of the weights: a Hub source's id, or the repo of a local Hub-cache snapshot."""
        if self.from_hub:
            return self.spec.id
        snapshot = HUB_SNAPSHOT.search(str(Path(self.location).resolve())) if self.spec.source == "local" else None
        return f"{snapshot.group(1)}/{snapshot.group(2)}" if snapshot else None

    @property
    def revision(self) -> str | None:
        """The Hub commit of the files, when known (the recipe's revision, or a cache snapshot's folder name)."""
        folder = self.files()
        snapshot = HUB_SNAPSHOT.search(str(folder.resolve())) if folder is not None else None
        return snapshot.group(3) if snapshot else (self.spec.revision if self.from_hub else None)

    @property
    def config_file(self) -> str:
        """The config a plan error names."""
        location = Path(self.location)
        if self.spec.source == "hub" or not location.exists():
            return f"the config of {self.location}"  # a Hub id, or a config shipped with quantlab
        return str(location if location.name == "config.json" else location / "config.json")

    def variant(self) -> tuple[PretrainedConfig, type]:
        """The config the recipe's variant instantiates, and the auto class that loads it."""
        return select_variant(self.config, self.spec.variant)

    @cached_property
    def meta(self) -> torch.nn.Module:
        """The recipe's variant on the meta device: shapes only, a fraction of a second at 27B."""
        config, auto_class = self.variant()
        return meta_model(config, auto_class, self.config_file)

    @cached_property
    def checkpoint_meta(self) -> torch.nn.Module:
        """The whole checkpoint's model on the meta device (the VL class where the config has a vision tower)."""
        return meta_model(self.config, where=self.config_file)

    def files(self, download: bool = False) -> Path | None:
        """The folder of the source's files (tokenizer, shards, MTP tensors): a Hub source's cache snapshot, fetched
        first when `download`; None for synthetic weights, or a Hub model not in the cache."""
        if self.spec.source in ("bundled", "local"):
            return Path(self.location)
        if self.spec.source != "hub":
            return None
        if download:
            return _download(self.spec)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.spec.id, "config.json", revision=self.spec.revision)
        return Path(cached).parent if isinstance(cached, str) else None

    def load_location(self) -> str:
        """What from_pretrained is given: the Hub id, or the checked folder."""
        if self.spec.source == "hub":
            return self.spec.id
        check_folder(self.location)
        return self.location

    def tokenizer(self, required: bool = False, what: str = "this run"):
        """The source's tokenizer; None where it has none, unless `required` (then a clear error)."""
        location = self._tokenizer_location()
        tokenizer, why = None, "random weights have no tokenizer"
        if location is not None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(location, revision=self.spec.revision)
            except Exception as exc:  # noqa: BLE001 - a checkpoint without tokenizer files still measures fine
                why = summary(exc)
        if tokenizer is None or isinstance(tokenizer, bool):
            if required:
                raise QuantlabError(f"{what} needs the tokenizer of {location or self.name}, which could not be "
                                    f"loaded: {why}")
            return None
        return tokenizer

    def _tokenizer_location(self) -> str | None:
        return self.spec.id if self.spec.source == "hub" else (None if self.synthetic else self.location)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the weights for a cache: the Hub commit, or file names, sizes and times."""
        if self.spec.source == "hub":
            folder = self.files()
            return {"hub": self.spec.id, "revision": self.spec.revision, "commit": folder.name if folder else None}
        if self.synthetic:
            return {"synthetic": self.location, "seed": self.spec.seed}
        folder = Path(self.location)
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
        return {"files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}

    def license(self) -> str | None:
        """The licence in the source's model card (quantlab's own for the bundled model), when it says one."""
        if self.spec.source == "bundled":
            return "apache-2.0"
        folder = self.files()
        card = folder / "README.md" if folder else None
        if card is None or not card.is_file():
            return None
        match = re.match(r"^---\s*\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:
            meta = None
        return str(meta["license"]) if isinstance(meta, dict) and meta.get("license") else None

    def check_files(self) -> tuple[str, ...]:
        """The shard headers against the model the config describes (names, shapes, dtypes), before any load."""
        if self.synthetic:
            return ()
        folder = self.files() if self.spec.source != "hub" else _complete_snapshot(self.files())
        if folder is None:
            return (f"{self.spec.id}: the weights are not (all) in the Hugging Face cache yet; their tensors are "
                    "checked against the config as they load",)
        check_folder(folder, progress=False)
        compare_with_model(folder, self.meta)
        return ()


@dataclass(frozen=True)
class MadeSource(ModelSource):
    """The bundled model's real weights, transformed (model.transform): a folder quantlab makes when the weights are
    first needed and caches (quantlab/made_sources.py). Planning needs none of it: the transform keeps the
    bundled model's config (dtype float32), shapes and tokenizer."""

    made: MadeModel | None = None

    @property
    def config_file(self) -> str:
        return str(self.made.inputs / "config.json")

    def files(self, download: bool = False) -> Path | None:
        """The made folder; None while it is not made, unless `download` (then it is made first)."""
        if not download:
            return self.made.made()
        folder = self.made.ensure()
        check_folder(folder, progress=False)
        compare_with_model(folder, self.meta)
        return folder

    def load_location(self) -> str:
        return str(self.files(download=True))

    def _tokenizer_location(self) -> str:
        return str(self.made.inputs)  # copied unchanged into the made folder (the key covers its bytes)

    def fingerprint(self) -> dict[str, Any]:
        return {"made": self.made.kind, "key": self.made.key}

    def license(self) -> str | None:
        return "apache-2.0"  # the bundled model's

    def check_files(self) -> tuple[str, ...]:
        folder = self.files()
        if folder is None:
            return ()  # made (and checked) on first use; the source's note says so
        check_folder(folder, progress=False)
        compare_with_model(folder, self.meta)
        return ()


@dataclass(frozen=True)
class GgufSource(ModelSource):
    """A GGUF file someone else made (model.source: gguf): the header stands in for the config (quantlab/llamacpp/
    header_config.py), the file itself is what llama.cpp loads, and its tokenizer is the one the header carries."""

    header: GgufHeader | None = None

    @property
    def gguf_file(self) -> Path:
        return Path(self.location)

    @property
    def hub_id(self) -> str | None:
        return self.spec.id

    @property
    def revision(self) -> str | None:
        snapshot = HUB_SNAPSHOT.search(str(self.gguf_file.resolve()))
        return snapshot.group(3) if snapshot else self.spec.revision

    @property
    def config_file(self) -> str:
        return f"the header of {self.location}"

    def files(self, download: bool = False) -> Path | None:
        return None  # no folder of Hugging Face files: the one file is gguf_file

    def load_location(self) -> str:
        raise QuantlabError(f"{self.location} is a GGUF file: llama.cpp loads it (measure.runtime: llama.cpp), "
                            "transformers does not")

    def tokenizer(self, required: bool = False, what: str = "this run"):
        """transformers' tokenizer rebuilt from the header's tokenizer.ggml.* (its gguf_file loader), once per source:
        the plan, the quality session and speculative decoding all ask for it."""
        tokenizer, why = self._header_tokenizer
        if tokenizer is None and required:
            raise QuantlabError(f"{what} needs the tokenizer of {self.location}, which transformers could not rebuild "
                                f"from its header: {why}")
        return tokenizer

    @cached_property
    def _header_tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(str(self.gguf_file.parent), gguf_file=self.gguf_file.name), None
        except Exception as exc:  # noqa: BLE001 - a GGUF without a tokenizer transformers can rebuild
            return None, summary(exc)

    def fingerprint(self) -> dict[str, Any]:
        stat = self.gguf_file.stat()
        return {"gguf": str(self.gguf_file.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def license(self) -> str | None:
        value = self.header.metadata.get("general.license") if self.header else None
        return str(value) if value else None

    def check_files(self) -> tuple[str, ...]:
        return ()  # the header was read and checked against the file's size when the source was resolved


def resolve(spec: ModelSpec) -> ModelSource:
    if spec.source == "gguf":
        return _gguf_source(spec)
    if spec.source == "bundled" and spec.transform is not None:
        return _transformed_bundled(spec)
    if spec.source == "bundled" and spec.mtp:
        return _bundled_with_mtp(spec)
    if spec.source == "bundled":
        folder = _bundled_dir()
        return ModelSource(spec, _config_from_folder(folder), "quantlab-bundled", str(folder))
    if spec.source == "local":
        folder = Path(spec.path).expanduser()
        notes = recover_interrupted_replace(folder)  # a `build --force` killed between its two renames
        config = _config_from_folder(folder)
        # a quantlab build is named after the model it was built from (its quantlab_build.json)
        return ModelSource(spec, config, built_from(folder) or folder.resolve().name, str(folder), tuple(notes))
    if spec.source == "synthetic":
        config, name, location = _synthetic_config(spec.config)
        return ModelSource(spec, config, name, location)
    return _hub_source(spec)


def model_class_name(config: PretrainedConfig, auto_class: type) -> str:
    return auto_class._model_mapping[type(config)].__name__


def meta_model(config: PretrainedConfig, auto_class: type | None = None, where: str = "the config") -> torch.nn.Module:
    """Instantiate on the meta device: shapes only, no memory, a fraction of a second at 27B."""
    import torch

    if auto_class is None:
        auto_class = select_variant(config, "full" if hasattr(config, "text_config") else "text")[1]
    check_config_sizes(config, where)
    try:
        with torch.device("meta"):
            return auto_class.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a user's config that transformers cannot build: one message
        raise QuantlabError(f"{where}: transformers cannot build the model from it ({summary(exc)})") from None


# ---- resolving ---------------------------------------------------------------------------------------------

def _bundled_dir() -> Path:
    try:
        return bundled.bundled_model_dir()
    except FileNotFoundError as exc:
        raise QuantlabError(str(exc)) from None


def _transformed_bundled(spec: ModelSpec) -> MadeSource:
    """The bundled model with model.transform applied: its config, name and cache folder, nothing made yet."""
    import torch

    from quantlab.salient import SALIENT_VERSION, bundled_salient, number

    salient = spec.transform.salient
    config = _config_from_folder(_bundled_dir())
    hidden = (getattr(config, "text_config", None) or config).hidden_size
    if salient.channels > hidden:
        raise QuantlabError(f"model.transform.salient.channels: {salient.channels} exceeds the bundled model's hidden "
                            f"size ({hidden}); pick between 1 and {hidden}")
    config.dtype = torch.float32  # as the made config.json says: the transform is done and saved in float32
    made = bundled_salient(salient.channels, salient.factor, salient.seed)
    note = (f"model: the bundled model's real weights with {salient.channels} salient channel(s) × "
            f"{number(salient.factor)} (seed {salient.seed}; quantlab/salient.py v{SALIENT_VERSION}, "
            f"function-preserving), made on first use into {made.folder}")
    return MadeSource(spec, config, f"quantlab-{made.label}", str(made.folder), (note,), made=made)


def _bundled_with_mtp(spec: ModelSpec) -> MadeSource:
    """The bundled model joined to its trained MTP head (quantlab/bundled/mtp.py): config and name, nothing made."""
    from quantlab.bundled.mtp import bundled_with_mtp

    _bundled_dir()
    made = bundled_with_mtp()
    config = _config_from_folder(_bundled_dir())
    config.mtp_num_hidden_layers = 1  # as the made config.json says
    note = (f"model: the bundled model with its trained MTP head (quantlab/bundled/mtp/), joined on first use into "
            f"{made.folder}")
    return MadeSource(spec, config, "quantlab-bundled-mtp", str(made.folder), (note,), made=made)


def _gguf_source(spec: ModelSpec) -> GgufSource:
    """The GGUF's header read and checked (a file that is not a GGUF, is cut short, or is of another architecture is
    one line here), and the config it stands for; a Hub GGUF is fetched first: its header is its config."""
    path = Path(spec.path).expanduser() if spec.path else _hub_gguf(spec)
    if path.is_dir():
        raise QuantlabError(f"model.path: {path} is a folder; source: gguf takes the .gguf file itself")
    header = read_header(path)
    config = header_config(header)
    by_type: dict[str, int] = {}
    for t in header.tensors:
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    mix = ", ".join(f"{k} {v / 1e6:,.2f} MB" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]))
    mtp = f", MTP block {header.metadata.get(f'{header.architecture}.nextn_predict_layers')}" if header.has_mtp() else ""
    notes = (f"model: GGUF {header_file_type(header)} read from its header ({header.architecture}, "
             f"{header.file_bytes:,} bytes, {len(header.tensors)} tensors: {mix}{mtp}); no quantlab manifest is read",)
    return GgufSource(spec, config, path.stem, str(path), notes, header=header)


def _hub_gguf(spec: ModelSpec) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(spec.id, spec.file, revision=spec.revision)
    if isinstance(cached, str):
        return Path(cached)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one line below
    try:
        return Path(hf_hub_download(spec.id, spec.file, revision=spec.revision))
    except Exception as exc:  # noqa: BLE001 - offline, gated, not found: one clear message
        raise QuantlabError(f"{spec.id}: {spec.file} is not in the Hugging Face cache and could not be downloaded "
                            f"({summary(exc)}); on a machine with network: hf download {spec.id} {spec.file}, then "
                            "model: {source: gguf, path: /that/file.gguf}") from None
    finally:
        hub_log.setLevel(level)


def _config_from_folder(folder: Path) -> PretrainedConfig:
    if not folder.is_dir():
        raise QuantlabError(f"{folder}: model folder not found{_why_missing(folder)}")
    raw = read_config(folder)
    model_type = raw["model_type"]
    check_config_sizes(raw, str(folder / "config.json"))  # before transformers: it names the field, not the value
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise QuantlabError(
            f"{folder}/config.json: unknown architecture (model_type {model_type[:100]!r}): transformers "
            f"{transformers.__version__} does not know it. Upgrade transformers, or check the config."
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any way transformers rejects a user's config is one message
        raise QuantlabError(f"{folder}/config.json: transformers cannot read it ({summary(exc)})") from None


def _why_missing(path: Path) -> str:
    if path.is_symlink():
        return " (a symbolic link to nothing, or a loop of links)"
    if path.exists():
        return " (it is a file, not a folder)"
    return ""


def _synthetic_config(name: str) -> tuple[PretrainedConfig, str, str]:
    if name in KNOWN_MODELS:
        return AutoConfig.from_pretrained(known_config_dir(name)), KNOWN_MODELS[name].display_name, name
    if name == "bundled":
        return AutoConfig.from_pretrained(_bundled_dir()), "quantlab-bundled", "bundled"
    if name == cache_shapes.NAME:  # Qwen3.6-27B's cache shapes, narrow widths (quantlab/cache_shapes.py)
        return cache_shapes.config(), cache_shapes.DISPLAY_NAME, name
    path = Path(name).expanduser()
    folder = path.parent if path.name == "config.json" else path
    if not _is_file(folder / "config.json"):
        known = ", ".join([*KNOWN_MODELS, cache_shapes.NAME, "bundled"])
        raise QuantlabError(f"model.config: '{name}' is neither a shipped config ({known}) nor a config.json or its folder")
    return _config_from_folder(folder), folder.resolve().name, str(path)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, a path through a file
        return False


def _hub_source(spec: ModelSpec) -> ModelSource:
    """The cached config if there is one; else quantlab's shipped copy for a known model; else the Hub."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = spec.id, spec.revision
    display = repo_id.rsplit("/", 1)[-1]
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return ModelSource(spec, _config_from_folder(Path(cached).parent), display, repo_id)
    known = known_by_hub_id(repo_id)
    if known is not None:
        note = f"plan uses quantlab's shipped config of {repo_id} (not in the HF cache yet); loading uses the Hub's"
        return ModelSource(spec, AutoConfig.from_pretrained(known_config_dir(known.key)), display, repo_id, (note,))
    try:
        return ModelSource(spec, AutoConfig.from_pretrained(repo_id, revision=revision), display, repo_id)
    except (OSError, ValueError) as exc:
        raise QuantlabError(hub_unavailable_message(repo_id, exc)) from None


def _complete_snapshot(folder: Path | None) -> Path | None:
    """A Hub snapshot folder whose shards are all in the cache; None while some are still to download."""
    if folder is None:
        return None
    try:
        shard_files(folder)
    except QuantlabError:
        return None
    return folder


def _download(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.id, revision=spec.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]))
    except Exception as exc:  # noqa: BLE001 - offline, gated, not found: one clear message
        raise QuantlabError(hub_unavailable_message(spec.id, exc)) from None
