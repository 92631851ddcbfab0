"""One quality evaluation: text and tokenizers first, then the reference and candidate passes.

    session = QualitySession(plan, output_dir)   # text, tokenizers, token ids: no weights yet
    session.prepare()                            # stored mode: the reference pass, then the reference is freed
    ... load and quantize the candidate ...
    result = session.evaluate(candidate_model)   # paired mode loads the reference here, beside the candidate

Paired mode is exact (full-vocabulary KL) and needs both models resident: fine for small models.
Stored mode never holds both: the reference's statistics go to disk first (quality/refstats.py), and
are reused by every later candidate with the same reference, text and settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from quantlab.errors import QuantlabError
from quantlab.measure import free_memory
from quantlab.quality import refstats
from quantlab.quality.top_k import TopKRows, TopKScorer, reference_log_probs_at, top_k_block
from quantlab.quality.metrics import (
    ROW_BUDGET_BYTES,
    TokenStats,
    log_probs,
    paired_block,
    reference_block,
    rows_per_block,
    sliding_windows,
    stored_block,
    window_logits,
)
from quantlab.schema.quality import QualityResult
from quantlab.text.heldout import HeldoutText, load_heldout
from quantlab.tokenizer_match import first_difference, tokenizer_identity
from quantlab.runtimes.transformers import load_model

CHARS_PER_TOKEN_BOUND = 16  # text to read per wanted token before tokenizing (doubled until enough)


class QualitySession:
    def __init__(self, plan, output_dir: str | Path | None = None, progress: bool = True,
                 echo: Callable[[str], None] = print, row_budget_bytes: int | None = None):
        if plan.quality is None:
            raise QuantlabError("this recipe has no quality section")
        self.plan, self.q, self.device = plan, plan.quality, plan.device
        self.progress, self.echo = progress, echo
        spec = self.q.spec
        out = Path(output_dir or plan.recipe.output.dir)
        self.cache_dir = Path(spec.reference.cache_dir).expanduser() if spec.reference.cache_dir else out / "quality-cache"
        if spec.mode == "stored":
            refstats.check_cache_dir(self.cache_dir)  # before the text, the tokenizers and any weights
        self.rows = rows_per_block(self.q.vocab_size, row_budget_bytes or ROW_BUDGET_BYTES)  # rows per fp32 block
        candidate_tok = plan.source.tokenizer(required=True, what="quality")
        reference_tok = candidate_tok if self.q.same_model else self.q.reference_source.tokenizer(required=True, what="quality")
        self.tokenizer_sha256 = check_same_tokenizer(reference_tok, candidate_tok, self.q.reference_label, plan.source.name)
        self.text: HeldoutText = load_heldout(spec, min_chars=spec.tokens * CHARS_PER_TOKEN_BOUND)
        self.ids = tokenize(reference_tok, self.text.text, spec.tokens)
        if self.ids.numel() < spec.context:
            raise QuantlabError(
                f"quality: the held-out text ({self.text.label}) is {self.ids.numel():,} tokens long, shorter than one "
                f"window (quality.context {spec.context:,}); use a longer text or a shorter context"
            )
        self.notes: list[str] = []  # the plan's quality notes are in the plan (and every record)
        if self.ids.numel() < spec.tokens:
            self.notes.append(f"the held-out text has {self.ids.numel():,} tokens; quality.tokens asked for {spec.tokens:,}")
        self.windows = sliding_windows(self.ids.numel(), spec.context, self.q.stride)
        self.stored: refstats.StoredReference | None = None

    # -- stored mode: the reference pass, before the candidate is loaded --------------------------------

    def prepare(self) -> refstats.StoredReference | None:
        if self.q.spec.mode != "stored" or self.stored is not None:
            return self.stored
        top_k = min(self.q.spec.top_k, self.q.vocab_size)
        key = refstats.cache_key(self._cache_payload(top_k))
        folder = refstats.cache_folder(self.cache_dir, self.q.reference_label.split(" (")[0], key)
        expected = {"windows": len(self.windows), "top_k": top_k, "reference": self.q.reference_label,
                    **self._cache_payload(top_k)}
        meta, unusable = refstats.find_complete(folder, len(self.windows), json.loads(json.dumps(expected, default=str)))
        if meta is not None:
            self.echo(f"quality: reusing reference statistics {folder} (every window file matches its sha256)")
            self.stored = refstats.StoredReference(folder, meta, reused=True, seconds=None)
            return self.stored
        if unusable is not None:  # quantlab's own cache folder (named by its key), unfinished or damaged: redo it
            if folder.is_symlink() or not folder.is_dir():
                raise QuantlabError(f"quality: {folder} cannot be used ({unusable}) and is not a folder quantlab made "
                                    "(a link or a file); move it away")
            self.echo(f"note: reference statistics {folder} cannot be used ({unusable}); computing them again")
            shutil.rmtree(folder)
        reference = self._load_reference()
        writer = refstats.StatsWriter(folder)
        try:
            start = time.perf_counter()
            for index, window in self._bar("quality: reference pass"):
                logits = window_logits(reference, self.ids, window, self.device)
                targets = self._targets(window)
                blocks = [
                    reference_block(logits[r : r + self.rows], targets[r : r + self.rows], top_k)
                    for r in range(0, window.scored, self.rows)
                ]
                writer.write(index, {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]})
                del logits, blocks
            seconds = time.perf_counter() - start
            meta = {"windows": len(self.windows), "top_k": top_k, "reference": self.q.reference_label,
                    "text": self.text.description, "seconds": seconds, **self._cache_payload(top_k)}
            meta = writer.finish(meta)
        except BaseException:
            writer.abort()
            raise
        finally:
            del reference
            free_memory(self.device)
        self.stored = refstats.StoredReference(folder, meta, reused=False, seconds=seconds)
        return self.stored

    # -- the candidate pass --------------------------------------------------------------------------------

    def evaluate(self, candidate: torch.nn.Module, candidate_label: str | None = None) -> QualityResult:
        candidate_label = candidate_label or f"{self.plan.source.name} {self.plan.method_label}"
        return self.evaluate_many({candidate_label: candidate})[candidate_label]

    def evaluate_many(self, candidates: dict[str, torch.nn.Module]) -> dict[str, QualityResult]:
        """Several candidates against the same reference; paired mode runs the reference once per window."""
        stats = {label: TokenStats() for label in candidates}
        if self.q.spec.mode == "paired":
            reference = self._load_reference()
            try:
                start = time.perf_counter()
                for index, window in self._bar("quality: reference + candidate"):
                    ref_logits = window_logits(reference, self.ids, window, self.device)
                    targets = self._targets(window)
                    for label, candidate in candidates.items():
                        if isinstance(candidate, TopKScorer):
                            lp_ref = log_probs(ref_logits)
                            self._add_top_k(stats[label], candidate, window, index, lp_ref,
                                            lp_ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1), lp_ref.argmax(-1))
                            continue
                        cand_logits = self._candidate_logits(candidate, window, ref_logits.shape[-1])
                        for r in range(0, window.scored, self.rows):
                            rows = slice(r, r + self.rows)
                            stats[label].add(*paired_block(ref_logits[rows], cand_logits[rows], targets[rows]),
                                             position=_positions(window, rows), window=index)
                        del cand_logits
                    del ref_logits
                seconds = time.perf_counter() - start
            finally:
                del reference
                free_memory(self.device)
            extra: dict[str, Any] = {}
        else:
            stored = self.prepare()
            start = time.perf_counter()
            for index, window in self._bar("quality: candidate pass"):
                ref = {k: v.to(self.device) for k, v in stored.window(index).items()}
                targets = self._targets(window)
                if not torch.equal(ref["targets"].long(), targets):
                    raise QuantlabError(f"{stored.folder}: stored reference statistics do not match this text; delete the folder")
                for label, candidate in candidates.items():
                    if isinstance(candidate, TopKScorer):
                        self._add_top_k(stats[label], candidate, window, index, ref, ref["target_logp"], ref["argmax"])
                        continue
                    cand_logits = self._candidate_logits(candidate, window, self.q.vocab_size)
                    for r in range(0, window.scored, self.rows):
                        rows = slice(r, r + self.rows)
                        stats[label].add(*stored_block({k: v[rows] for k, v in ref.items()}, cand_logits[rows], targets[rows]),
                                         position=_positions(window, rows), window=index)
                    del cand_logits
            seconds = time.perf_counter() - start
            free_memory(self.device)
            extra = {
                "top_k": stored.meta["top_k"],
                "reference_cache": str(stored.folder),
                "reference_cache_reused": stored.reused,
                "reference_seconds": stored.seconds,
            }
        return {label: self._result(label, s.summary(), seconds, {**extra, **_top_k_fields(candidates[label])})
                for label, s in stats.items()}

    def _add_top_k(self, stats: TokenStats, candidate: TopKScorer, window, index: int, ref, ref_target_logp,
                   ref_argmax) -> None:
        """A top-k candidate's rows for one window, against the reference's (full log-probs or stored rows)."""
        rows = candidate.score(self.ids[window.begin : window.end])
        if rows.ids.shape[0] < window.scored:
            raise QuantlabError(f"quality: {candidate.label} gave {rows.ids.shape[0]} rows for a window of "
                                f"{window.scored} scored tokens")
        keep = slice(rows.ids.shape[0] - window.scored, None)  # rows predicting window.first .. end-1
        cand = TopKRows(rows.ids[keep].to(self.device), rows.logp[keep].to(self.device),
                        rows.target_logp[keep].to(self.device))
        targets = self._targets(window)
        stats.add(*top_k_block(reference_log_probs_at(ref, cand.ids), ref_target_logp, ref_argmax, cand, targets),
                  position=_positions(window, slice(0, window.scored)), window=index)

    def _result(self, label: str, summary: dict[str, float], seconds: float, extra: dict[str, Any]) -> QualityResult:
        notes = tuple(self.notes) + tuple(extra.pop("notes", ()))
        return QualityResult(
            mode=self.q.spec.mode,
            kl_exact=self.q.spec.mode == "paired" and not extra.pop("kl_bound", False),
            candidate=label,
            reference=self.q.reference_label,
            reference_model=self.q.reference.model_dump(),
            text=self.text.description,
            text_label=self.text.label,
            text_tokens=self.ids.numel(),
            context=self.q.spec.context,
            stride=self.q.stride,
            windows=len(self.windows),
            device=str(self.device),
            candidate_seconds=seconds,  # the whole pass: with several candidates, all of them
            notes=notes,
            **summary,
            **extra,
        )

    # -- helpers -------------------------------------------------------------------------------------------

    def _bar(self, desc: str):
        return tqdm(list(enumerate(self.windows)), desc=desc, unit="window", leave=False, disable=not self.progress)

    def _targets(self, window) -> torch.Tensor:
        return self.ids[window.first : window.end].to(self.device)

    def _candidate_logits(self, candidate: torch.nn.Module, window, vocab: int) -> torch.Tensor:
        logits = window_logits(candidate, self.ids, window, self.device)
        if logits.shape[-1] != vocab:
            raise QuantlabError(
                f"quality: the candidate's logits have {logits.shape[-1]:,} entries per token, the reference's {vocab:,}"
            )
        return logits

    def _load_reference(self) -> torch.nn.Module:
        self.echo(f"quality: loading the reference, {self.q.reference_label}")
        return load_model(self.q.reference_source, self.device).model

    def _cache_payload(self, top_k: int) -> dict[str, Any]:
        import transformers

        spec = self.q.spec
        return {
            "reference_model": self.q.reference.model_dump(),
            "weights": self.q.reference_source.fingerprint(),
            "device_type": self.device.type,
            "text_sha256": self.text.description.get("sha256"),
            "ids_sha256": hashlib.sha256(self.ids.numpy().tobytes()).hexdigest(),
            "context": spec.context,
            "stride": self.q.stride,
            "top_k": top_k,
            "tokenizer_sha256": self.tokenizer_sha256,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }


def _top_k_fields(candidate) -> dict[str, Any]:
    """A top-k candidate's result says what it is: a lower bound from its top-k, like stored mode's."""
    if not isinstance(candidate, TopKScorer):
        return {}
    return {"kl_bound": True, "top_k": candidate.top_k,
            "notes": (f"candidate scored from {candidate.label}: its top-{candidate.top_k} log-probs and the prompt "
                      "token's per position; the KL is a lower bound (top-k cells + the rest), the perplexity, Δp and "
                      "top-1 agreement are exact",)}


def _positions(window, rows: slice) -> torch.Tensor:
    """Each scored token's position in its window: the tokens of context it had."""
    first = window.first - window.begin
    return torch.arange(first, window.end - window.begin)[rows]


def check_same_tokenizer(reference, candidate, reference_name: str, candidate_name: str) -> str:
    """The shared tokenizer's sha256; QuantlabError when the two tokenizers differ."""
    ref_size, ref_hash = tokenizer_identity(reference)
    if candidate is reference:
        return ref_hash
    cand_size, cand_hash = tokenizer_identity(candidate)
    if ref_size != cand_size or ref_hash != cand_hash:
        where = first_difference(candidate, reference, "the candidate", "the reference") or \
            f"sha256 {cand_hash[:12]} vs {ref_hash[:12]}"
        raise QuantlabError(
            f"quality: the reference ({reference_name}) and the candidate ({candidate_name}) have different tokenizers "
            f"({where}); KL and perplexity compare distributions token by token, so both need the same tokenizer"
        )
    return ref_hash


def tokenize(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """The first `tokens` ids of `text` (no special tokens), tokenizing only as much text as needed."""
    chars = tokens * CHARS_PER_TOKEN_BOUND
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text) or len(ids) > tokens + 64:  # the margin keeps the cut away from the kept ids
            break
        chars *= 2
    return torch.tensor(ids[:tokens], dtype=torch.long)
