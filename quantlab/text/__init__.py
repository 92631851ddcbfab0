"""Text, on a floor of its own: where a text comes from (`source.py`: a local file, a Hub dataset, the bundled
corpus), the bundled corpus itself (`corpus.py`), the held-out text quality is measured on (`heldout.py`), and the
calibration windows that AWQ and llama.cpp's importance matrix share (`calibration.py`, with `CalibrationSpec`,
which belongs to no method). Nothing here imports a method, a recipe, a source, a runtime or a command.
"""
