"""llama.cpp's own speculative decoding with a GGUF's MTP head, and its own decoding without a draft, one prompt per
call, read back from what the tools print:

- on: `llama-speculative-simple --spec-type draft-mtp --spec-draft-n-max K`: its "decoded N tokens in S seconds"
  (the whole draft-verify loop, wall time), the MTP driver's statistics line (#calls, #gen tokens, #acc tokens,
  #mean acc len), and the buffers of the MTP draft context (the lines after "creating MTP draft context").
  It runs no decode without a draft (`--spec-type none` exits 1), hence the other tool:
- off: `llama-completion` (what llama-cli runs), greedy: its "eval time = T ms / N runs", llama.cpp's own decode
  timing of the N single-token steps.
Both at trace verbosity (-lv 4), which is where llama.cpp prints its buffers and the MTP statistics; their logs go
to stderr and the generated text to stdout, read apart.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from quantlab.errors import QuantlabError
from quantlab.llamacpp.binding import BUFFER_LINE
from quantlab.llamacpp.tools import BUILD_HINT, TAIL_LINES, LlamaCpp, tool_env

SPECULATIVE_TOOL = "llama-speculative-simple"
PLAIN_TOOL = "llama-completion"
DRAFT_CONTEXT = "creating MTP draft context"
DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
ENCODED = re.compile(r"encoded\s+(\d+) tokens in")
STATS = re.compile(r"draft-mtp: #calls\(b,g,a\) =\s*(\d+)\s+(\d+)\s+(\d+), #gen drafts =\s*(\d+), "
                   r"#acc drafts =\s*(\d+), #gen tokens =\s*(\d+), #acc tokens =\s*(\d+)")
MEAN_LENGTH = re.compile(r"#mean acc len = ([\d.]+)")
EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs")
PROMPT_EVAL = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")
TIMEOUT_S = 3600
ATTEMPTS = 5


@dataclass(frozen=True)
class DecodeRun:
    """One prompt, decoded greedily by one of the two tools."""

    prompt_tokens: int
    decoded: int  # tokens the timing covers
    decode_seconds: float
    text: str  # the generated text it printed
    draft_calls: int = 0  # the MTP driver: accept calls (one per verified draft)
    drafted: int = 0  # tokens the MTP head drafted
    accepted: int = 0  # of those, accepted
    mean_accepted_length: float | None = None  # llama.cpp's "#mean acc len": 1 + accepted ÷ accept calls
    buffers: dict[str, int] = field(default_factory=dict)  # the main context's: "CPU KV" → bytes, llama.cpp's log
    draft_buffers: dict[str, int] = field(default_factory=dict)  # the MTP draft context's

    @property
    def tok_s(self) -> float:
        return self.decoded / self.decode_seconds


def decode_with_mtp(tools: LlamaCpp, gguf: Path, prompt: str, new_tokens: int, k: int, common: list[str]) -> DecodeRun:
    """One greedy decode of `new_tokens` after `prompt` with the MTP head drafting `k` tokens per step."""
    args = [*common, "--spec-type", "draft-mtp", "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0"]
    out, err = _run(tools, SPECULATIVE_TOOL, gguf, prompt, new_tokens, args, f"{SPECULATIVE_TOOL} (MTP, k={k})",
                    STATS)
    decoded, encoded, stats = DECODED.search(err), ENCODED.search(err), STATS.search(err)
    if decoded is None or encoded is None or stats is None:
        raise QuantlabError(f"{SPECULATIVE_TOOL}: its log lacks the 'encoded/decoded N tokens' or the draft-mtp "
                            f"statistics line{_tail(err)}")
    lines = err.splitlines()
    split = next((i for i, line in enumerate(lines) if DRAFT_CONTEXT in line), None)
    if split is None:
        raise QuantlabError(f"{SPECULATIVE_TOOL}: it made no MTP draft context{_tail(err)}")
    mean = MEAN_LENGTH.search(err)
    return DecodeRun(prompt_tokens=int(encoded.group(1)), decoded=int(decoded.group(1)),
                     decode_seconds=float(decoded.group(2)), text=_after_prompt(out, prompt),
                     draft_calls=int(stats.group(3)), drafted=int(stats.group(6)), accepted=int(stats.group(7)),
                     mean_accepted_length=float(mean.group(1)) if mean else None,
                     buffers=buffers(lines[:split]), draft_buffers=buffers(lines[split:]))


def decode_without_draft(tools: LlamaCpp, gguf: Path, prompt: str, new_tokens: int, common: list[str]) -> DecodeRun:
    """The same prompt decoded greedily with no draft: llama-completion, llama.cpp's own decode timing."""
    out, err = _run(tools, PLAIN_TOOL, gguf, prompt, new_tokens, [*common, "-no-cnv", "--no-display-prompt"],
                    f"{PLAIN_TOOL} (no draft)", EVAL)
    evaluated, prompt_eval = EVAL.search(err), PROMPT_EVAL.search(err)
    if evaluated is None or prompt_eval is None:
        raise QuantlabError(f"{PLAIN_TOOL}: its log lacks llama.cpp's 'eval time' lines{_tail(err)}")
    return DecodeRun(prompt_tokens=int(prompt_eval.group(1)), decoded=int(evaluated.group(2)),
                     decode_seconds=float(evaluated.group(1)) / 1000, text=out.rstrip("\n"),
                     buffers=buffers(err.splitlines()))


def buffers(lines: list[str]) -> dict[str, int]:
    """'CPU KV buffer size = 0.25 MiB' → {'CPU KV': 262144}. A buffer reserved again (llama.cpp re-reserves the
    compute buffer for another graph) counts once, at its largest: it replaces the earlier one."""
    found: dict[str, int] = {}
    for line in lines:
        match = BUFFER_LINE.search(line)
        if match:
            key = f"{match.group(1)} {match.group(2)}"
            found[key] = max(found.get(key, 0), round(float(match.group(3)) * 2**20))
    return found


def _after_prompt(out: str, prompt: str) -> str:
    """llama-speculative-simple prints two newlines, the prompt, then what it generates: the generated text. The prompt
    it echoes is the one it read from the file, which loses one trailing newline (common/arg.cpp, -f)."""
    text = out[2:] if out.startswith("\n\n") else out
    for echoed in (prompt, prompt[:-1] if prompt.endswith("\n") else None):
        if echoed is not None and text.startswith(echoed):
            return text[len(echoed):].rstrip("\n")
    raise QuantlabError(f"{SPECULATIVE_TOOL}: its output does not begin with the prompt it was given")


def same_text(a: str, b: str) -> bool:
    """The same greedy tokens print the same text; one tool may decode a few tokens more than the other (a draft
    accepted past the end), so the shorter must begin the longer."""
    return a.startswith(b) or b.startswith(a)


def _run(tools: LlamaCpp, tool: str, gguf: Path, prompt: str, new_tokens: int, args: list[str], what: str,
         last: re.Pattern) -> tuple[str, str]:
    """The tool's (stdout, stderr). Its log goes through common's logging thread, whose logger is leaked at exit
    unflushed (common/log.cpp, common_log_main: "logs may be lost if not flushed before the program exits",
    llama.cpp issue 22142), and these tools do not flush it: seen here, `llama-completion` ending after "load time",
    before "eval time", in about one run in five under load. A run whose log lacks `last` is run again, up to
    ATTEMPTS times; the runs are not mixed."""
    for _ in range(ATTEMPTS):
        out, err = _run_once(tools, tool, gguf, prompt, new_tokens, args, what)
        if last.search(err):
            return out, err
    raise QuantlabError(f"{what}: {ATTEMPTS} runs, and no log held its last line ({last.pattern}){_tail(err)}")


def _run_once(tools: LlamaCpp, tool: str, gguf: Path, prompt: str, new_tokens: int, args: list[str],
              what: str) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="quantlab-spec-") as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        command = [str(tools.tool(tool)), "-m", str(gguf), "-f", str(prompt_file), "-n", str(new_tokens),
                   "--temp", "0", "--ignore-eos", "-lv", "4", *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace", env=tool_env(tools),
                                  timeout=TIMEOUT_S)
        except OSError as exc:
            raise QuantlabError(f"{what}: could not start {command[0]}: {exc}. {BUILD_HINT}") from None
    if done.returncode != 0:
        raise QuantlabError(f"{what} failed (exit {done.returncode}){_tail(done.stderr)}")
    return done.stdout, done.stderr


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()][-TAIL_LINES:]
    return "; its last lines:\n" + "\n".join("    " + line for line in lines)
