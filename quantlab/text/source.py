"""Where a recipe's text comes from (quality's held-out text, AWQ's calibration text): one schema, one loader
(quantlab/text/heldout.py). Subclasses set WHERE, the recipe section named in error messages."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from quantlab.fields import STRICT, PathText, RepoId, Revision


class TextSourceSpec(BaseModel):
    model_config = STRICT
    WHERE: ClassVar[str] = "text"
    DEFAULT_SPLIT: ClassVar[str] = "test"  # hub only; other sources leave `split` unset, so records don't name one

    source: Literal["default", "file", "folder", "hub"] = "default"
    path: PathText | None = Field(None, description="file/folder: a local path; hub: a data file inside the dataset repo")
    dataset: RepoId | None = Field(None, description="hub: dataset repo id, e.g. Salesforce/wikitext")
    revision: Revision | None = Field(None, description="hub: dataset revision")
    split: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                              description="hub: the split whose data files are read (when path is not given); "
                              "default: DEFAULT_SPLIT")
    column: str = Field("text", min_length=1, max_length=200, description="the text column of .jsonl/.json/.csv/.parquet files")

    @property
    def effective_split(self) -> str:
        return self.split or self.DEFAULT_SPLIT

    @model_validator(mode="after")
    def _fields_match_source(self):
        where = self.WHERE
        if self.source in ("file", "folder") and self.path is None:
            raise ValueError(f"source '{self.source}' needs {where}.path")
        if self.source == "hub" and self.dataset is None:
            raise ValueError(f"source 'hub' needs {where}.dataset (a Hub dataset id)")
        if self.source != "hub":
            for name in ("dataset", "revision", "split"):
                if name in self.model_fields_set:
                    raise ValueError(f"{where}.{name} is only used with source 'hub', not '{self.source}'; remove it")
        if self.source == "default" and self.path is not None:
            raise ValueError(f"{where}.path is not used with source 'default'; use source: file or folder")
        return self
