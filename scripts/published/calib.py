"""Calibration text: Python stdlib source (the bundled model was trained on it), 256-token windows; and the two
scripts' folders: the bundled model, and an output folder that must not exist yet."""
import pathlib, sys, sysconfig

SOURCE = str(pathlib.Path(__file__).resolve().parents[2] / "quantlab" / "bundled" / "model")


def new_output_folder() -> str:
    """The command line's OUT, refused when it exists: nothing is overwritten."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT")
    if pathlib.Path(sys.argv[1]).exists():
        sys.exit(f"error: {sys.argv[1]} exists; give a new folder")
    return sys.argv[1]


def calib_texts_ids(tokenizer, n=32, seq_len=256):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:200]
    text = "\n".join(p.read_text(errors="replace") for p in files[::5])
    ids = tokenizer(text)["input_ids"]
    out = []
    for i in range(n):
        chunk = ids[i * 997 * 3 : i * 997 * 3 + seq_len]
        assert len(chunk) == seq_len
        out.append(chunk)
    return out

EVAL_TEXT = '''def _compile(pattern, flags):
    # internal: compile pattern
    if isinstance(flags, RegexFlag):
        flags = flags.value
    try:
        return _cache2[type(pattern), pattern, flags]
    except KeyError:
        pass
    key = (type(pattern), pattern, flags)
    # Item in _cache should be moved to the end if found.
    p = _cache.pop(key, None)
    if p is None:
        if isinstance(pattern, Pattern):
            if flags:
                raise ValueError(
                    "cannot process flags argument with a compiled pattern")
            return pattern
'''
